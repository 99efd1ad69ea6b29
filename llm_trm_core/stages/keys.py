"""Each stage's artifact key: its code version, the config parts it reads, its upstream keys
(docs/architecture.md, "Keys").

The tables below are derived from the stage declarations (`llm_trm_core/stages/declarations.py`):
change a stage's version, reads or view there. Bump a stage's code version in the same commit as any
change that alters its outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from llm_trm_core.config import PipelineConfig, keyed_dump
from llm_trm_core.stages.declaration import Derived, stage
from llm_trm_core.store import stage_key

STAGE_CODE_VERSIONS: Mapping[str, str] = Derived(lambda s: s.version)
# Sections ("compressor") or single fields ("compressor.layer") each stage reads.
STAGE_SECTIONS: Mapping[str, tuple[str, ...]] = Derived(lambda s: s.reads)
STAGE_VIEWS: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]] = Derived(
    lambda s: s.view, keep=lambda s: s.view is not None
)


def _lookup(cfg: PipelineConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return keyed_dump(value) if isinstance(value, BaseModel) else value


def stage_config(cfg: PipelineConfig, name: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config of a stage: what it reads, without fields that do not affect outputs."""
    declared = stage(name)
    dumped = {part: _lookup(cfg, part) for part in declared.reads}
    dumped.update(extra or {})
    return declared.view(dumped) if declared.view else dumped


def key_for(
    cfg: PipelineConfig,
    name: str,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    return stage_key(name, stage(name).version, stage_config(cfg, name, extra), upstream or {})
