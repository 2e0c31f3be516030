"""The topology file reference (control.tools.config_doc) is generated from the config models,
covers every key the parser accepts, and the README's copy is the current one."""

from __future__ import annotations

import re
from pathlib import Path

from control.core import config as cfg
from control.tools.config_doc import readme_section, reference, type_name, with_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def _keys(model) -> set[str]:
    return set(model.model_fields)


def test_every_key_of_every_section_is_documented():
    ref = reference()
    tables = [set(re.findall(r"^\| `([a-z_]+)` \|", part, re.M))
              for part in ref.split("#### ")[1:]]
    models = [cfg.NetworkSection, cfg.Ports, cfg.LinkDefaults, cfg.DataplaneSection,
              cfg.GkmSection, cfg.ApiSection, cfg.MetricsSection, cfg.RoutingSection, cfg.Node,
              cfg.Link, cfg.Sae,
              cfg.EmulatorSource, cfg.SftpSource, cfg.SftpEnd, cfg.Etsi014Source,
              cfg.Etsi014End]
    nested = {"a", "b"}  # a source's per-end tables, documented as tables of their own
    for m in models:
        keys = _keys(m) - (nested if "kind" in _keys(m) else set())
        assert any(keys <= t for t in tables), f"{m.__name__}: no table lists all of {keys}"
    assert len(tables) == len(models)  # one table per model, none twice
    for heading in ("[network]", "[[links]]", "[links.source]", "[links.source.a]", "[[saes]]"):
        assert f"`{heading}`" in ref


def test_types_defaults_and_limits_come_from_the_models():
    ref = reference()
    assert '| `ring_capacity` | size ("64KiB", "1MiB", or bytes) | - | shared-memory key ' \
           'ring per direction and link end; default: 2 s of the link' in ref
    assert '| `key_rate_mbps` | number | `1000.0` |' in ref
    assert '| `ratio` | ratio ("a:b") | `"1:1"` |' in ref
    assert '| `guard` | `"auto"` \\| `"off"` \\| `"require"` | `"auto"` |' in ref
    assert re.search(r"\| `port` \| integer \| `9464` \| .*>= 1, <= 65535", ref)
    assert '`[links.source]` kind = "etsi014"' in ref


def test_type_names():
    assert type_name(int) == "integer" and type_name(bool) == "boolean"
    assert type_name(int | None) == "integer"
    assert type_name(list[str]) == "list of string"


def test_the_readme_carries_the_current_reference():
    text = README.read_text()
    assert readme_section(text) == reference(), \
        "README's reference is stale: run .venv/bin/python -c \"from pathlib import Path; " \
        "from control.tools.config_doc import with_reference as w; p = Path('README.md'); " \
        "p.write_text(w(p.read_text()))\""
    assert with_reference(text) == text
