"""The "latest" section of bench/RESULTS.md, rewritten from a `qkdctl bench all` JSON: the
table and the machine it ran on, between two markers, the rest of the file kept as it is
(the per-bench sections with their history and readings are written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.summary import Row, calibration_line, markdown_table

BEGIN = "<!-- bench-all:begin -->"
END = "<!-- bench-all:end -->"


def machine_line(m: dict) -> str:
    mem = m.get("memory_bytes")
    parts = [m.get("cpu_model") or "unknown CPU", f"{m.get('cores', '?')} cores",
             f"{mem / 2**30:.0f} GiB" if mem else None,
             f"kernel {m['kernel']}" if m.get("kernel") else None, m.get("os"),
             f"Python {m['python']}" if m.get("python") else None,
             f"host {m['host']}" if m.get("host") else None]
    return ", ".join(p for p in parts if p)


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def shown(path: str, root: Path | None) -> str:
    """``path`` relative to ``root`` where it lies under it (the repository's paths)."""
    if root is not None:
        try:
            return str(Path(path).resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return path


def section(data: dict, json_path: str, root: Path | None = None, level: int = 2) -> str:
    """The section's text, markers included, from a `bench all` JSON object; paths
    under ``root`` are shown relative to it; its heading at ``level``."""
    rows = [Row.from_dict(r) for r in data["summary"]]
    kind = "quick smoke run (short runs, fewer sizes: not comparable)" \
        if data.get("profile") == "quick" else "full run"
    lines = [BEGIN,
             f"{'#' * level} Latest: `qkdctl bench all` ({data['date']})",
             "Written by `qkdctl bench all` from its JSON; the next run replaces this "
             "section.",
             "",
             f"Machine: {machine_line(data['machine'])}.",
             f"Calibration (same run, best short windows): "
             f"{calibration_line(data.get('calibration'))}.",
             f"{kind[0].upper() + kind[1:]}; took {duration(data['seconds'])}. Ratios are "
             "ours over the paper's figure, and over the conventional way and the ceiling "
             "(the same work without our code in the way), both measured in the same run; "
             "the targets are ratios of the ceiling.",
             "",
             markdown_table(rows),
             ""]
    failed = [n for n, b in data["benches"].items() if not b["ok"]]
    if failed:
        lines += [f"Failed: {', '.join(failed)} (errors in the table; logs in the JSON's "
                  "`log`).", ""]
    plots = [shown(p, root) for b in data["benches"].values() if b["ok"]
             for p in [(b.get("result") or {}).get("plot")] if p]
    lines.append(f"Raw figures: `{shown(json_path, root)}`"
                 + (f"; plots {', '.join(f'`{p}`' for p in plots)}" if plots else "") + ".")
    lines.append(END)
    return "\n".join(lines)


def rewrite(text: str, new_section: str) -> str:
    """``text`` with its marked section replaced by ``new_section``; without one, the
    section goes before the first second-level heading (after the file's preamble), or at
    the end. A file with a begin marker and no end marker is refused."""
    if BEGIN in text:
        start = text.index(BEGIN)
        end = text.find(END, start)
        if end < 0:
            raise ValueError(f"RESULTS.md has {BEGIN!r} without {END!r}: fix it by hand")
        return text[:start] + new_section + text[end + len(END):]
    at = text.find("\n## ")
    if at < 0:
        return text.rstrip("\n") + "\n\n" + new_section + "\n"
    return text[:at + 1] + new_section + "\n\n" + text[at + 1:]


def record(json_path: Path, results_md: Path, readme: Path | None = None) -> list[Path]:
    """Rewrite ``results_md``'s section from the JSON at ``json_path``; paths are shown
    relative to the directory above ``results_md``'s (the repository's root). A
    ``readme`` that carries the markers gets the same table (one heading level lower, in
    its Benchmarks section). The files written."""
    data = json.loads(json_path.read_text())
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    root = results_md.resolve().parent.parent
    results_md.write_text(rewrite(text, section(data, str(json_path), root)))
    written = [results_md]
    if readme is not None and readme.exists() and BEGIN in (r := readme.read_text()):
        readme.write_text(rewrite(r, section(data, str(json_path), readme.resolve().parent,
                                             level=3)))
        written.append(readme)
    return written
