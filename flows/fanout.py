"""Units of work fanned out over a Prefect work pool: one flow run per unit, placed by Prefect, written once
for the three kinds the graph fans out (llm_trm_core/stages/graph.py):

- datagen shard ranges (`runtime.fanout_deployment`, flows/datagen_fanout.py `datagen_shards_flow`);
- parts of the corpus hidden-state pass (`runtime.fanout_hiddens_deployment`, `hidden_parts_flow` below):
  part i of N computes its contiguous range of the pass's units (`compressor.hidden_unit_sequences`);
- ranges of evaluation chunks (`runtime.fanout_evaluate_deployment`, `evaluate_chunks_flow` below), for each
  of the graph's evaluations (before and after GRPO alike).

The caller (`fan_out`) submits each unit as a run of the kind's deployment (`run_deployment`, linked to the
calling run as a subflow), at most `runtime.fanout_workers` at once; every unit run commits its pieces to
the shared store (datagen shards, hidden-state units, evaluation chunks: each one on its own, so a run that
dies keeps what it had committed). The caller waits; a run that ends Failed, Crashed or Cancelled (its
worker preempted or killed) is submitted again, at most `runtime.fanout_resubmits` times per unit, and
resumes from the store. When every unit has completed, the caller's own stage task finds the pieces
committed and writes the artifact in-process, so the artifacts (keys and bytes) are those of a one-worker
run. Besides the caller's bound, a deployment can carry a Prefect concurrency limit (prefect.yaml
`concurrency_limit`): the server then holds the runs beyond it in the queue, whoever submits them.
docs/architecture.md ("Fan-out over workers") describes the setup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.stages.spread import evaluation_committed, spread_evaluation, spread_hiddens
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.attempts import flow_guard

logger = logging.getLogger(__name__)

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_SECONDS = 2.0  # between reads of the unit runs' states
REPORT_SECONDS = 60.0  # between progress lines while waiting

# the config setting that names each kind's deployment, and the stage whose work it fans out
SETTINGS = {
    "datagen": ("fanout_deployment", "datagen"),
    "hiddens": ("fanout_hiddens_deployment", "hiddens"),
    "evaluate": ("fanout_evaluate_deployment", "evaluate"),
}


@flow(name="hiddens-parts")
def hidden_parts_flow(cfg: PipelineConfig, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """Part `part` of `parts` of the corpus hidden-state pass, each of its units committed to the store
    (resumable): the unit one worker runs when the pass is fanned out, spread over the worker's GPUs
    (`runtime.generation_processes`, llm_trm_core/stages/spread.py)."""
    with flow_guard(cfg, "compressor"):
        from llm_trm_core.stages.compressor import run_corpus_hidden_units

        spread = spread_hiddens(cfg, part, parts)
        return spread or run_corpus_hidden_units(cfg, ArtifactStore(cfg.store.root), part, parts)


@flow(name="evaluate-chunks")
def evaluate_chunks_flow(
    cfg: PipelineConfig,
    first: int = 0,
    end: int = 1,
    problems: dict[str, Any] | None = None,
    compressor: dict[str, Any] | None = None,
    trm: dict[str, Any] | None = None,
    latent: dict[str, Any] | None = None,
    grpo: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluation chunks `first`..`end`-1 of the evaluation of these upstream manifests (as the graph passes
    them), each committed to the store (resumable): the unit one worker runs when evaluation is fanned out,
    spread over the worker's GPUs (`runtime.generation_processes`, llm_trm_core/stages/spread.py)."""
    with flow_guard(cfg, "evaluate"):
        from llm_trm_core.stages.evaluate import run_evaluate_chunks

        given = {"problems": problems, "compressor": compressor, "trm": trm, "latent": latent}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise UserError(
                f"evaluate-chunks needs the upstream manifests {', '.join(missing)} (the graph passes them)"
            )
        spread = spread_evaluation(cfg, {**given, "grpo": grpo, "before": before}, first, end)
        if spread is not None:
            return spread
        m = {name: Manifest.model_validate(value) for name, value in given.items()}
        return run_evaluate_chunks(
            cfg, ArtifactStore(cfg.store.root), m["problems"], m["compressor"], m["trm"], m["latent"], first, end,
            grpo=None if grpo is None else Manifest.model_validate(grpo),
            before=None if before is None else Manifest.model_validate(before),
        )  # fmt: skip


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "a temporary server (PREFECT_API_URL is unset)")


def check_deployment(client: SyncPrefectClient, name: str, setting: str = "fanout_deployment") -> str:
    """The work pool of deployment `name` (named by `runtime.<setting>`); UserError (one line naming the fix)
    when either does not exist."""
    unset = f"or unset runtime.{setting} to run that work in this run"
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise UserError(
            f"runtime.{setting}={name}: no such deployment on the Prefect API at {_api()}. Fix: deploy it "
            f"(python -m deployments.deploy) on the server the workers use (PREFECT_API_URL), {unset}"
        ) from None
    pool = deployment.work_pool_name
    if not pool:
        raise UserError(f"runtime.{setting}={name} has no work pool; redeploy it with one, {unset}")
    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise UserError(
            f"runtime.{setting}={name}: its work pool {pool} does not exist. Fix: create it "
            f"(python -m deployments.deploy) and start a worker on it (prefect worker start --pool {pool}), {unset}"
        ) from None
    if not any(w.status is not None and w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(pool)):
        logger.warning("work pool %s has no online worker yet: the fanned-out runs wait until one starts", pool)
    return pool


def check_fanout(cfg: PipelineConfig, stages: Iterable[str]) -> None:
    """Refuse (one-line UserError) a fan-out deployment that does not exist or has no work pool, for each
    kind whose stage is among `stages` (the command's): the CLI calls this before the flow starts."""
    wanted = set(stages)
    checks = [
        (setting, name)
        for setting, stage in SETTINGS.values()
        if stage in wanted and (name := getattr(cfg.runtime, setting)) is not None
    ]
    if checks:
        with get_client(sync_client=True) as client:
            for setting, name in checks:
                check_deployment(client, name, setting)


@dataclass
class Unit:
    """One unit of work (a range of shards, hidden-state units or evaluation chunks) and the flow runs
    submitted for it (the last is current)."""

    label: str  # in log lines: "shards 0..1"
    run_name: str  # the runs' names, before "-try<attempt>"
    parameters: dict[str, Any]  # the run's parameters besides the config
    runs: list[FlowRun] = field(default_factory=list)
    state: str = "SCHEDULED"


def _submit(cfg: PipelineConfig, deployment: str, unit: Unit) -> None:
    attempt = len(unit.runs) + 1
    run: FlowRun = run_deployment(  # type: ignore[assignment]
        deployment,
        parameters={"cfg": cfg.model_dump(mode="json"), **unit.parameters},
        flow_run_name=f"{unit.run_name}-try{attempt}",
        timeout=0,
        as_subflow=True,
    )
    unit.runs.append(run)
    unit.state = "SCHEDULED"
    logger.info("%s: submitted run %s (attempt %d) to %s", unit.label, run.name, attempt, deployment)


def fan_out(cfg: PipelineConfig, kind: str, what: str, units: list[Unit], done: int = 0) -> None:
    """Run every unit as a run of the deployment of `kind` (SETTINGS), at most `runtime.fanout_workers` at
    once; wait for all, re-submitting lost ones (module docstring). `what` names the units in messages
    ("shard ranges"), `done`: how many were committed already (not in `units`). UserError when a unit is
    still not done after `runtime.fanout_resubmits` re-submissions."""
    setting = SETTINGS[kind][0]
    deployment = getattr(cfg.runtime, setting)
    if deployment is None:
        return
    limit = cfg.runtime.fanout_workers
    resubmits = cfg.runtime.fanout_resubmits
    if done:
        logger.info("%s fan-out: %d of %d %s are committed already", kind, done, done + len(units), what)
    if not units:
        return
    with get_client(sync_client=True) as client:
        pool = check_deployment(client, deployment, setting)
        logger.info(
            "%s fan-out: %d %s on %s (pool %s), at most %d at once", kind, len(units), what, deployment, pool, limit
        )
        waiting = list(units)  # not yet submitted
        last_report = time.monotonic()
        while True:
            running = [u for u in units if u.runs and u.state not in FINAL]
            while waiting and len(running) < limit:
                unit = waiting.pop(0)
                _submit(cfg, deployment, unit)
                running.append(unit)
            for unit in running:
                run = client.read_flow_run(unit.runs[-1].id)
                unit.state = run.state.type.value if run.state is not None else "PENDING"
                if unit.state in FINAL - {"COMPLETED"} and len(unit.runs) <= resubmits:
                    logger.warning(
                        "%s: run %s ended %s; submitting it again (%d of runtime.fanout_resubmits=%d)",
                        unit.label, run.name, unit.state, len(unit.runs), resubmits,
                    )  # fmt: skip
                    waiting.insert(0, unit)
            if not waiting and all(u.state in FINAL for u in units):
                break
            if time.monotonic() - last_report > REPORT_SECONDS:
                last_report = time.monotonic()
                logger.info("%s fan-out: %s", kind, ", ".join(f"{u.label} {u.state.lower()}" for u in units))
            time.sleep(POLL_SECONDS)
    lost = [f"{u.label} ({u.runs[-1].name}: {u.state.lower()})" for u in units if u.state != "COMPLETED"]
    if lost:
        raise UserError(
            f"{kind} fan-out: {len(lost)} {what} did not complete after runtime.fanout_resubmits={resubmits} "
            f"re-submissions: {', '.join(lost)}. Read those runs' logs, fix the cause and run again (committed "
            "work comes back from the store)."
        )
    logger.info("%s fan-out: all %d %s completed", kind, len(units), what)


def fan_out_hiddens(cfg: PipelineConfig, parts: int) -> None:
    """The corpus hidden-state pass as `parts` runs of `runtime.fanout_hiddens_deployment` (none when the
    artifact is committed already)."""
    from llm_trm_core.stages.keys import key_for

    if ArtifactStore(cfg.store.root).read_manifest("hiddens", key_for(cfg, "hiddens")) is not None:
        return
    units = [
        Unit(f"hidden-state part {i + 1} of {parts}", f"hiddens-part-{i}-of-{parts}", {"part": i, "parts": parts})
        for i in range(parts)
    ]
    fan_out(cfg, "hiddens", "hidden-state parts", units)


def fan_out_evaluation(cfg: PipelineConfig, inputs: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
    """The evaluation of the upstream manifests `inputs` (problems, compressor, trm, latent[, grpo, before]) as
    runs of `runtime.fanout_evaluate_deployment`, one per chunk range not committed yet."""
    tag = "-after-grpo" if inputs.get("grpo") is not None else ""
    units = [
        Unit(f"evaluation chunks {a}..{b - 1}", f"evaluate{tag}-chunks-{a}-{b - 1}", {"first": a, "end": b, **inputs})
        for a, b in ranges
        if not evaluation_committed(cfg, inputs, a, b)
    ]
    fan_out(cfg, "evaluate", "chunk ranges", units, len(ranges) - len(units))
