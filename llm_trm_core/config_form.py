"""The JSON schema of the config as a *partial* form: what the Prefect UI renders for a run.

A run's config is "the preset, with the fields you set changed" (`PipelineConfig` merges what it is
given onto the named preset). A schema that carried the class defaults would make the UI pre-fill
every field with them and send the whole dump back, silently replacing the preset's values. So the
schema carries no defaults: an empty field means "the preset's value", and each field's description
says what every preset resolves it to. Nullable fields are shown with their real type (leave them
empty to keep the preset's value; an explicit `null` stays possible through JSON input), and the
labels are the config keys a user also types on the command line (`compressor.d_prime=128`).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel

ROOT_ORDER = (
    "preset", "store", "runtime", "tracking", "model", "problems", "corpus", "compressor", "sweep", "datagen",
    "pairs", "trm", "latent", "evaluate", "grpo",
)  # fmt: skip


def partial_form_schema(cls: type[BaseModel], schema: dict[str, Any]) -> None:
    """Rewrite one section's JSON schema in place (called by `Section.__get_pydantic_json_schema__`)."""
    path = section_paths().get(cls)
    for name, prop in schema.get("properties", {}).items():
        prop.pop("default", None)
        _drop_null_branch(prop)
        prop["title"] = name
        if prop.get("type") == "boolean":
            del prop["type"]
            prop["enum"] = [True, False]
        if path is None or (path, name) == ("", "preset") or _is_section(cls.model_fields[name].annotation):
            continue
        values = preset_values(f"{path}.{name}" if path else name)
        if values:
            prop["description"] = (prop.get("description", "").rstrip() + " " + values).strip()
    schema.pop("required", None)
    if path == "":  # the root: the fields most runs set first, then the sections in pipeline order
        props = schema.get("properties", {})
        first = [name for name in ROOT_ORDER if name in props]
        schema["properties"] = {name: props[name] for name in [*first, *(n for n in props if n not in first)]}


def _drop_null_branch(prop: dict[str, Any]) -> None:
    """`anyOf: [X, null]` -> X, keeping title and description."""
    branches = prop.get("anyOf")
    if not isinstance(branches, list):
        return
    kept = [b for b in branches if b != {"type": "null"}]
    if len(kept) == 1 and len(kept) < len(branches):
        del prop["anyOf"]
        prop.update({k: v for k, v in kept[0].items() if k not in prop})


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


@functools.cache
def section_paths() -> dict[type[BaseModel], str]:
    """Each section class -> its dotted path in `PipelineConfig` ('' for the root)."""
    from llm_trm_core.config import PipelineConfig

    paths: dict[type[BaseModel], str] = {PipelineConfig: ""}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if _is_section(field.annotation):
                sub = field.annotation
                assert isinstance(sub, type)
                paths.setdefault(sub, f"{prefix}{name}")
                walk(sub, f"{prefix}{name}.")

    walk(PipelineConfig, "")
    return paths


@functools.cache
def _resolved_presets() -> dict[str, dict[str, Any]]:
    from llm_trm_core.config import PRESETS, load_config

    return {name: load_config(name).model_dump(mode="json") for name in PRESETS}


def preset_values(dotted: str) -> str:
    """'Preset values: tiny 16 · local 64 · smollm3-3b 256.' (or 'Every preset: X.')"""
    found: dict[str, Any] = {}
    for preset, data in _resolved_presets().items():
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return ""
            node = node[part]
        found[preset] = node
    shown = {p: _show(v) for p, v in found.items()}
    if len(set(shown.values())) == 1:
        return f"Every preset: {next(iter(shown.values()))}."
    return "Preset values: " + " · ".join(f"{p} {v}" for p, v in shown.items()) + "."


def _show(value: Any) -> str:
    text = "unset" if value is None else value if isinstance(value, str) and value else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
