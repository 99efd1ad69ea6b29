"""No stale keys: every config field a stage reads while the tiny pipeline runs is part of its store key.

Each stage run is watched (`FieldReads`): every read of a config field is recorded under the running
stage. A field outside the `reads` of the stage and of the stages upstream of it (whose keys enter its
key; llm_trm_core/stages/declarations.py) means that changing it changes the stage's outputs while its
artifact key, and so its cache, stays the same.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from llm_trm_core.config import PipelineConfig, Section, load_config
from llm_trm_core.stages.declaration import Stage, stage
from llm_trm_core.stages.graph import run_plain
from llm_trm_core.store import Manifest

# Read by stages without changing what they write: where artifacts go and how runs are tracked.
NOT_OUTPUTS = ("store.", "tracking.", "preset")


def _keyed(model: BaseModel, name: str) -> bool:
    extra = type(model).model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_output") is False)


Paths = dict[int, tuple[str, frozenset[str]]]  # id(section) -> (its dotted prefix, its keyed leaf fields)


class FieldReads:
    """Records `section.field` reads on one config (and the sections it shares) per running stage."""

    def __init__(self) -> None:
        self.reads: dict[str, set[str]] = defaultdict(set)
        self._stack: list[tuple[str, Paths]] = []

    @staticmethod
    def _paths(model: BaseModel, prefix: str = "", into: Paths | None = None) -> Paths:
        into = {} if into is None else into
        leaves: list[str] = []
        for name in type(model).model_fields:
            value = object.__getattribute__(model, name)
            if isinstance(value, BaseModel):
                FieldReads._paths(value, f"{prefix}{name}.", into)
            elif _keyed(model, name):
                leaves.append(name)
        into.setdefault(id(model), (prefix, frozenset(leaves)))  # a shared section: its first path
        return into

    def _seen(self, model: BaseModel, name: str) -> None:
        if self._stack:
            stage_name, paths = self._stack[-1]
            found = paths.get(id(model))
            if found is not None and name in found[1]:
                self.reads[stage_name].add(found[0] + name)

    @contextmanager
    def watching(self) -> Iterator[FieldReads]:
        seen = self._seen

        def spy(model: BaseModel, name: str) -> Any:
            value = object.__getattribute__(model, name)
            seen(model, name)
            return value

        Section.__getattribute__ = spy  # type: ignore[method-assign, assignment]
        try:
            yield self
        finally:
            del Section.__getattribute__

    def hook(self, name: str, cfg: PipelineConfig, run: Callable[[], Manifest]) -> Manifest:
        self._stack.append((name, self._paths(cfg)))
        try:
            return run()
        finally:
            self._stack.pop()

    @staticmethod
    def allowed(name: str, declared: Callable[[str], Stage] = stage) -> set[str]:
        """The stage's reads and those of every stage upstream of it (their keys are part of its key)."""
        found = set(declared(name).reads)
        for upstream in declared(name).upstream:
            found |= FieldReads.allowed(upstream, declared)
        return found

    def undeclared(self, declared: Callable[[str], Stage] = stage) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, fields in self.reads.items():
            allowed = self.allowed(name, declared)
            stray = sorted(
                f
                for f in fields
                if not f.startswith(NOT_OUTPUTS) and not any(f == r or f.startswith(r + ".") for r in allowed)
            )
            if stray:
                out[name] = stray
        return out


# Less work, the same code paths (which fields a stage reads does not depend on these counts).
SHORT = ["compressor.epochs=1", "trm.epochs=1", "latent.epochs=1", "grpo.steps=2", "evaluate.num_problems=4"]


@pytest.mark.timeout(1800)
def test_every_field_a_stage_reads_is_in_its_key(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'store'}", *SHORT])
    recorder = FieldReads()
    with recorder.watching():
        results = run_plain(cfg, "pipeline", hook=recorder.hook)
    assert {"trm", "latent", "grpo", "evaluate"} <= set(recorder.reads) and results["evaluate"]["key"]
    assert recorder.undeclared() == {}, "stages read config fields outside their declared `reads` (stale keys)"


def test_a_read_outside_the_declared_key_is_caught(tmp_path: Path) -> None:
    """The check can fail: the toy stage reads `toy.scale` only; make it also read `trm.lr`."""
    from tests import toy_stage

    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'store'}"])
    recorder = FieldReads()
    with recorder.watching(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(toy_stage, "EXTRA_READ", "trm.lr")
        run_plain(cfg, "toy", hook=recorder.hook)
    assert recorder.undeclared() == {"toy": ["trm.lr"]}
    recorder = FieldReads()
    with recorder.watching():
        run_plain(cfg, "toy", hook=recorder.hook)
    assert recorder.undeclared() == {}
