"""What a stage is, declared once (docs/architecture.md, "Declaring a stage").

A `Stage` names everything the rest of the code derives: the store key's ingredients (code version,
the config sections or single fields it reads, a view that drops what does not matter), the stages
whose artifacts it takes, its run function, the Prefect task names that run it, and its report (the
title, summary lines, tables and plot published beside its manifest and printed by the CLI).
`declare()` registers one; the built-in stages are declared in `llm_trm_core/stages/declarations.py`,
a new stage in a file of its own (see `tests/toy_stage.py`) that is imported before use or named in
`$LLM_TRM_STAGE_MODULES`.

Derived from the declarations: `STAGE_CODE_VERSIONS`, `STAGE_SECTIONS`, `STAGE_VIEWS`
(`llm_trm_core/stages/keys.py`), the Prefect cache policy's task mapping and task factory
(`tasks/caching.py`, `tasks/stage.py`), the graph without Prefect (`llm_trm_core/stages/graph.py`),
the generated CLI commands and the one printer of every stage's results (`flows/cli.py`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from llm_trm_core.reporting import fmt
from llm_trm_core.store import Manifest

View = Callable[[dict[str, Any]], dict[str, Any]]

BUILTIN_DECLARATIONS = "llm_trm_core.stages.declarations"
# Modules declaring more stages, comma-separated (imported with the built-in ones, e.g. by a worker).
STAGE_MODULES_ENV = "LLM_TRM_STAGE_MODULES"


class Table(NamedTuple):
    """A table built from a manifest: a Prefect table artifact under `key`, printed by the CLI under
    `description` unless `printed` is False (e.g. a per-step history: the artifact only)."""

    key: str
    rows: list[dict[str, Any]]
    description: str
    columns: tuple[str, ...] = ()  # default: the first row's keys
    printed: bool = True

    def cells(self) -> list[dict[str, str]]:
        """The rows as formatted text, in the table's columns."""
        columns = self.columns or tuple(self.rows[0] if self.rows else ())
        return [{c: fmt(row.get(c)) for c in columns} for row in self.rows]


@dataclass(frozen=True)
class Report:
    """What a stage publishes beside its manifest (Prefect artifacts) and what the CLI prints of it.

    `title`: the heading of its Prefect artifacts (a callable gets the config and the manifest);
    `plot`: a PNG of the artifact shown inline under its report.md; `files`: more of the artifact's
    files worth opening, listed beside its URI after report.md and the plot; `summary`: lines built
    from the manifest; `tables`: tables built from the manifest (`Table`: key, rows, description,
    columns), each published under its own artifact key; `metrics`: whether the CLI also prints the
    manifest's metrics as they are (a comparison table of `test` and `baselines`, then every
    scalar), False when the summary and tables already say what matters.
    """

    title: str | Callable[[Any, Manifest], str]
    plot: str | None = None
    plot_alt: str = ""
    files: tuple[str, ...] = ()
    summary: Callable[[Manifest], list[str]] | None = None
    tables: Callable[[Manifest], list[Table]] | None = None
    metrics: bool = True

    def heading(self, cfg: Any, manifest: Manifest) -> str:
        return self.title if isinstance(self.title, str) else self.title(cfg, manifest)

    def listed_files(self) -> tuple[str, ...]:
        return (*(("report.md", self.plot) if self.plot else ()), *self.files)

    def lines(self, manifest: Manifest) -> list[str]:
        return self.summary(manifest) if self.summary else []

    def tables_of(self, manifest: Manifest) -> list[Table]:
        return self.tables(manifest) if self.tables else []


@dataclass(frozen=True)
class Stage:
    """One stage, declared once.

    `reads`: config sections ("trm") or single fields ("compressor.layer") the stage's outputs depend
    on; they make up its store key, and `tests/test_stage_reads.py` fails when the stage reads a
    field outside them. `view` drops parts of that dump that do not change the outputs. `upstream`:
    the stages whose artifacts the run function takes, in its argument order. `run(cfg, store,
    *upstream_manifests, **options) -> Manifest`. `tasks`: the Prefect task names that run it (the
    first is the default; default: the stage's name); `task_run_name`: Prefect's run-name template.
    `command`, `help`: the CLI command that runs the stage with everything upstream of it (None: no
    command of its own) and its help line.
    """

    name: str
    version: str
    reads: tuple[str, ...]
    run: Callable[..., Manifest] | None = None
    upstream: tuple[str, ...] = ()
    view: View | None = None
    tasks: tuple[str, ...] = ()
    report: Report | None = None
    task_run_name: str | None = None
    command: str | None = None
    help: str = ""

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks or ((self.name,) if self.run is not None else ())


_REGISTRY: dict[str, Stage] = {}
_loaded = False


def declare(stage: Stage) -> Stage:
    """Register a stage (again with the same declaration is a no-op; another one under its name is refused)."""
    known = _REGISTRY.get(stage.name)
    if known is not None and known != stage:
        raise ValueError(f"stage {stage.name!r} is declared twice")
    taken = {t: s.name for s in _REGISTRY.values() for t in s.task_names if s.name != stage.name}
    clash = [t for t in stage.task_names if t in taken]
    if clash:
        raise ValueError(f"stage {stage.name!r}: task names {clash} belong to another stage")
    _REGISTRY[stage.name] = stage
    return stage


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(BUILTIN_DECLARATIONS)
        for module in filter(None, (m.strip() for m in os.environ.get(STAGE_MODULES_ENV, "").split(","))):
            importlib.import_module(module)


def stages() -> dict[str, Stage]:
    """Every declared stage by name (the built-in ones are loaded on first use)."""
    _load_builtin()
    return dict(_REGISTRY)


def stage(name: str) -> Stage:
    found = stages().get(name)
    if found is None:
        raise KeyError(f"no stage {name!r} is declared; declared: {', '.join(sorted(_REGISTRY))}")
    return found


def stage_of_task(task_name: str) -> Stage | None:
    """The stage a Prefect task name runs (None when no declaration names it)."""
    for declared in stages().values():
        if task_name in declared.task_names:
            return declared
    return None


class Derived(Mapping[str, Any]):
    """A read-only table derived from the declarations on each lookup (`keys.STAGE_SECTIONS`, ...)."""

    def __init__(self, pick: Callable[[Stage], Any], keep: Callable[[Stage], bool] = lambda s: True) -> None:
        self._pick = pick
        self._keep = keep

    def _table(self) -> dict[str, Any]:
        return {name: self._pick(s) for name, s in stages().items() if self._keep(s)}

    def __getitem__(self, name: str) -> Any:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


def task_stages() -> dict[str, str]:
    """Prefect task name -> the stage whose config view and code version key it (the cache policy's mapping)."""
    return {task: s.name for s in stages().values() for task in s.task_names}
