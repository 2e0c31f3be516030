"""The nodes and links of the benchmarks' networks, written once."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def line(names: Sequence[str], net: int, closed: bool = False,
         extra: Callable[[int], str] = lambda i: "") -> str:
    """Nodes ``names`` in a line, A - B - ..., as TOML for a str.format template (braces
    escaped): each link its own /30 in 10.<net>.<i>.0 (each bench its own ``net``) and an
    unthrottled AES-CTR emulator as its key source. ``closed``: the last node is linked
    back to the first (a ring); ``extra(i)``: more lines for link ``i`` (from 1)."""
    out = [f'[[nodes]]\nname = "{n}"\n' for n in names]
    ends = [*names[1:], *names[:1]] if closed else names[1:]
    for i, (a, b) in enumerate(zip(names, ends, strict=False), 1):
        out.append(f'[[links]]\na = "{a}"\nb = "{b}"\n'
                   f'underlay = ["10.{net}.{i}.1/30", "10.{net}.{i}.2/30"]\n{extra(i)}'
                   'source = {{ kind = "emulator", generator = "aes-ctr" }}\n')
    return "".join(out)


def saes(*placed: tuple[str, str]) -> str:
    """``[[saes]]`` entries, (SAE ID, node) each, as TOML for a str.format template."""
    return "".join(f'[[saes]]\nid = "{sae}"\nnode = "{node}"\n' for sae, node in placed)
