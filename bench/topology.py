"""Topology files of the benches' and the tests' networks, built from what differs between
them: which nodes, which links (each its own /30 in 10.<net>.<i>.0), their key source,
SAEs and the sections' settings. Pure: dicts in, TOML text out.

A network is a dict of TOML's shape (``{"network": {...}, "nodes": [...], ...}``); the
builders return parts of it and ``render`` joins them and writes the TOML, ``template``
the same for a str.format template (braces doubled), as the benches' ``Net`` fills one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

EMULATOR = {"kind": "emulator", "generator": "aes-ctr"}  # unthrottled AES-CTR emulator

Part = Mapping[str, Any]


def network(name: str, prefix: str, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[network]`` section and the other sections named (``defaults``, ``ports``,
    ``dataplane``, ``gkm``, ``api``, ``metrics`` ...), each a dict of its settings."""
    return {"network": {"name": name, "prefix": prefix}, **sections}


def graph(names: Sequence[str], pairs: Iterable[tuple[str, str]], net: int, *,
          source: Mapping[str, Any] | None = EMULATOR,
          extra: Callable[[int], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Nodes ``names`` and a link per (a, b) of ``pairs``: link ``i`` (from 1) has the
    underlay 10.<net>.<i>.1/30 - .2/30, ``source`` as its key source (None: the
    default source) and the settings ``extra(i)``."""
    links = []
    for i, (a, b) in enumerate(pairs, 1):
        link: dict[str, Any] = {"a": a, "b": b,
                                "underlay": [f"10.{net}.{i}.1/30", f"10.{net}.{i}.2/30"]}
        link.update(extra(i) if extra else {})
        if source is not None:
            link["source"] = dict(source)
        links.append(link)
    return {"nodes": [{"name": n} for n in names], "links": links}


def line(names: Sequence[str], net: int, *, closed: bool = False,
         source: Mapping[str, Any] | None = EMULATOR,
         extra: Callable[[int], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Nodes ``names`` in a line, A - B - ...; ``closed``: the last one linked back to the
    first (a ring, its last link named, say, C-A). Links as in ``graph``."""
    ends = [*names[1:], *names[:1]] if closed else names[1:]
    return graph(names, zip(names, ends, strict=False), net, source=source, extra=extra)


def triangle(net: int, *, source: Mapping[str, Any] | None = EMULATOR,
             extra: Callable[[int], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """A, B and C, linked A-B, B-C and A-C (in that order). Links as in ``graph``."""
    return graph("ABC", [("A", "B"), ("B", "C"), ("A", "C")], net, source=source,
                 extra=extra)


def saes(*placed: tuple[str, str]) -> dict[str, Any]:
    """``[[saes]]`` entries, (SAE ID, node) each."""
    return {"saes": [{"id": sae, "node": node} for sae, node in placed]}


def merge(*parts: Part) -> dict[str, Any]:
    """One network of ``parts``: lists of tables are joined, sections merged (a later
    part's setting wins)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, v in part.items():
            if isinstance(v, list) and isinstance(out.get(key), list):
                out[key] = [*out[key], *v]
            elif isinstance(v, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **v}
            else:
                out[key] = v
    return out


def render(*parts: Part) -> str:
    """The TOML text of ``merge(*parts)``: a ``[section]`` per dict, a ``[[name]]`` per
    table of a list of dicts (tables within them inline), in the parts' order. Written here,
    not by tomli-w: tomli-w writes a list of small tables as an inline array, which lands
    in the section above it when a bench appends this text to its own template."""
    data = merge(*parts)
    out = [f"{k} = {_value(v)}\n" for k, v in data.items() if not _is_table(v)]
    for key, v in data.items():
        if isinstance(v, Mapping):
            out.append(f"[{key}]\n" + _pairs(v))
        elif _is_table(v):
            out.extend(f"[[{key}]]\n" + _pairs(t) for t in v)
    return "".join(out)


def tunnel_bench(name: str, dataplane: str, nodes: Mapping[str, Any]) -> str:
    """The str.format template of a bench that measures the OTP tunnels: key from the
    unthrottled emulators in 1 MiB blocks into rings of ``{capacity}``, the ``[dataplane]``
    lines given (format fields allowed), no global key, and the ``nodes`` part (``line``,
    ``graph`` ...); ``{prefix}`` is the bench network's own."""
    return (f'[network]\nname = "{name}"\nprefix = "{{prefix}}"\n'
            f'[defaults]\nkey_rate_mbps = 0\nblock_size = "1MiB"\n'
            f'ring_capacity = "{{capacity}}"\n'
            f"[dataplane]\n{dataplane.strip()}\n"
            f"[gkm]\npairs = []  # no global key: this network measures the tunnels\n"
            + template(nodes))


def template(*parts: Part) -> str:
    """``render(*parts)`` with its braces doubled, to stand in a str.format template."""
    return render(*parts).replace("{", "{{").replace("}", "}}")


def _is_table(v: object) -> bool:
    return isinstance(v, Mapping) or (isinstance(v, list) and bool(v)
                                      and all(isinstance(t, Mapping) for t in v))


def _pairs(table: Mapping[str, Any]) -> str:
    return "".join(f"{k} = {_value(v)}\n" for k, v in table.items())


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: quotes, backslashes and controls escaped
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML value for {type(v).__name__}")
