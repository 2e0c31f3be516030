"""The nodes and links of the benchmarks' networks, written once."""

from __future__ import annotations


def line(names: str, net: int) -> str:
    """Nodes ``names`` (one letter each) in a line, A - B - ..., as TOML for a str.format
    template (braces escaped): each link its own /30 in 10.<net>.<i>.0 (each bench its own
    ``net``) and an unthrottled AES-CTR emulator as its key source."""
    out = [f'[[nodes]]\nname = "{n}"\n' for n in names]
    for i, (a, b) in enumerate(zip(names, names[1:], strict=False), 1):
        out.append(f'[[links]]\na = "{a}"\nb = "{b}"\n'
                   f'underlay = ["10.{net}.{i}.1/30", "10.{net}.{i}.2/30"]\n'
                   'source = {{ kind = "emulator", generator = "aes-ctr" }}\n')
    return "".join(out)
