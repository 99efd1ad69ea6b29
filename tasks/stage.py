"""The Prefect task of every declared stage, made from its declaration (llm_trm_core/stages/declaration.py).

`stage_task(name)` is a `@task` named `name` (one of the stage's task names) whose parameters are the
run function's without `store` and in-process-only helpers (an accelerator, a loaded model): manifests
travel as JSON, the task validates them, runs the stage on `cfg.store.root`, publishes the declared
report (its tables, the manifest's metrics and summary, the plot inline) and returns the manifest as
JSON. Run it as `cached(stage_task(name), cfg)(cfg, ...)` (tasks/caching.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_table_artifact

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.declaration import Stage, stage_of_task
from llm_trm_core.stages.graph import _as_manifests
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.artifacts import publish_manifest, report_with_plot
from tasks.retry import RETRIES

# run-function parameters a task takes besides manifests (JSON-able); others with a default stay in-process
_SCALARS = frozenset({"str", "int", "float", "bool", "Phase"})


def _is_task_input(param: inspect.Parameter) -> bool:
    annotation = str(param.annotation).removesuffix(" | None")
    return (
        param.default is inspect.Parameter.empty
        or annotation in _SCALARS
        or annotation.startswith("Literal[")
        or annotation in ("Manifest", "list[Manifest]")
    )


def _task_parameters(run: Any) -> list[inspect.Parameter]:
    return [
        param.replace(annotation=inspect.Parameter.empty)
        for param in inspect.signature(run).parameters.values()
        if param.name != "store" and _is_task_input(param)
    ]


def publish(declared: Stage, cfg: PipelineConfig, store: ArtifactStore, manifest: Manifest) -> None:
    """The stage's declared report as Prefect artifacts."""
    report = declared.report
    if report is None:
        return
    for table in report.tables_of(manifest):
        create_table_artifact(key=table.key, table=table.cells(), description=table.description)
    body = report_with_plot(store, manifest, report.plot, report.plot_alt) if report.plot else ""
    publish_manifest(manifest, report.heading(cfg, manifest), body)


@functools.cache
def stage_task(name: str) -> Task[..., dict[str, Any]]:
    """The Prefect task `name` of its declared stage (made once per name)."""
    declared = stage_of_task(name)
    if declared is None or declared.run is None:
        raise KeyError(f"no declared stage runs task {name!r}")
    run = declared.run
    signature = inspect.Signature(_task_parameters(run))

    def body(*args: Any, **kwargs: Any) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        cfg: PipelineConfig = bound.arguments["cfg"]
        store = ArtifactStore(cfg.store.root)
        inputs = {k: _as_manifests(v) for k, v in bound.arguments.items() if k != "cfg"}
        manifest = run(cfg, store, **inputs)
        publish(declared, cfg, store, manifest)
        return manifest.model_dump(mode="json")

    body.__signature__ = signature  # type: ignore[attr-defined]
    body.__name__ = body.__qualname__ = name.replace("-", "_") + "_task"
    body.__doc__ = f"Stage `{declared.name}` ({run.__module__}.{run.__name__})."
    return task(name=name, task_run_name=declared.task_run_name, **RETRIES)(body)
