"""Which config sections and code version make up each stage's artifact key (DESIGN §3).

Bump a stage's code version in the same commit as any change that alters its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_trm_core.config import PipelineConfig, keyed_dump
from llm_trm_core.store import stage_key

STAGE_CODE_VERSIONS: dict[str, str] = {
    "problems": "1",
}

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "problems": ("problems",),
}


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The resolved config of a stage: the sections it reads, without fields that do not affect outputs."""
    return {section: keyed_dump(getattr(cfg, section)) for section in STAGE_SECTIONS[stage]}


def key_for(cfg: PipelineConfig, stage: str, upstream: Mapping[str, str] | None = None) -> str:
    return stage_key(stage, STAGE_CODE_VERSIONS[stage], stage_config(cfg, stage), upstream or {})
