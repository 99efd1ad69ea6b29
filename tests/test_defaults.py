"""One source of defaults: code defaults against the presets (llm_trm_core/presets/*.yaml).

Every disagreement is listed in docs/defaults.md (regenerate the table from this test's failure
message), so a default changed in code or in a preset never changes a run unseen; and no code
default is dead (overridden by every preset), so a value read in config.py is one some run uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llm_trm_core.config import DEFAULT_PRESET, PRESETS, PipelineConfig, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "defaults.md"
BEGIN, END = "<!-- disagreements: begin -->", "<!-- disagreements: end -->"


def _flat(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def code_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in PipelineConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(_flat(field.annotation(), f"{name}."))
    return out


def disagreements() -> dict[str, dict[str, Any]]:
    """field -> {"code": default, preset: value, ...} for every field some preset sets otherwise."""
    presets = {p: _flat(load_config(p)) for p in PRESETS}
    out = {}
    for field, value in code_defaults().items():
        values = {p: presets[p].get(field, "(a section)") for p in PRESETS}
        if any(v != value for v in values.values()):
            out[field] = {"code": value, **values}
    return out


def _cell(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def table() -> str:
    head = f"| field | code | {' | '.join(PRESETS)} |\n|---|---|{'---|' * len(PRESETS)}\n"
    rows = [
        f"| `{field}` | {_cell(v['code'])} | "
        + " | ".join(("" if v[p] == v["code"] else _cell(v[p])) for p in PRESETS)
        + " |"
        for field, v in disagreements().items()
    ]
    return head + "\n".join(rows) + "\n"


def test_every_disagreement_between_code_and_presets_is_listed() -> None:
    text = DOC.read_text()
    listed = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip() + "\n"
    assert listed == table(), f"update the table in {DOC} between its markers to:\n\n{table()}"


def test_no_code_default_is_overridden_by_every_preset() -> None:
    dead = {f: v for f, v in disagreements().items() if all(v[p] != v["code"] for p in PRESETS)}
    assert dead == {}, f"code defaults no preset uses (make one preset's value the default): {dead}"


def test_a_config_without_a_preset_says_which_one_it_used(caplog: Any) -> None:
    with caplog.at_level("INFO", logger="llm_trm_core.config"):
        cfg = PipelineConfig.model_validate({})
    assert cfg.preset == DEFAULT_PRESET == "local"
    assert f"no preset given: using the '{DEFAULT_PRESET}' preset" in caplog.text
