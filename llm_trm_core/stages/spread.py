"""The generation work spread over this machine's GPUs: one torchrun rank per GPU, each computing its share
of the same units the Prefect fan-out places on other machines (flows/fanout.py).

Three kinds, each committed to the store unit by unit already (docs/architecture.md, "Fan-out over
workers"): datagen shards (each its own artifact), corpus hidden-state units (checkpoints of `hiddens`)
and evaluation chunks (checkpoints of `evaluate`). With `runtime.generation_processes` above 1 (`auto`:
every CUDA device this process sees, 1 on CPU), `spread_shards`, `spread_hiddens` and `spread_evaluation`
launch `llm-trm units <kind>` under torchrun (`llm_trm_core/launch.py` `launch_stage`, children that die
with the caller); rank r of N binds GPU r (`bind_local_gpu`) and computes units r, r+N, ... of the range
(`run_share`; the units are ordered by size, so the ranks get similar loads), skipping every unit that is
committed already. After torchrun exits, the caller runs its normal code path, which finds the units
committed and writes the artifacts: the same keys and bytes as one process, since no rank decides anything
the one-process run would not (each unit is computed by exactly the code that computes it there).

A rank that dies (SIGKILL, OOM, an error) makes torchrun stop the others and the launch raise one UserError
line naming it; what the ranks committed stays, so a rerun computes only the missing units. Each function
returns None (and launches nothing) with one process, inside a torchrun worker, or when everything is
committed already.

Across machines the two combine: the Prefect fan-out cuts the work into one range per machine (its unit
flows call these functions on their range), and each machine spreads its range over its own GPUs.
"""

from __future__ import annotations

import logging
from typing import Any

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.launch import generation_processes, in_torchrun, launch_stage
from llm_trm_core.store import ArtifactStore, Manifest

logger = logging.getLogger(__name__)

KINDS = ("datagen", "hiddens", "evaluate")
ENTRY = "flows.cli"  # `python -m flows.cli units <kind> --config-json F --inputs-json G` on every rank


def processes(cfg: PipelineConfig) -> int:
    """How many local processes the generation work gets here: 1 inside a torchrun worker."""
    return 1 if in_torchrun() else generation_processes(cfg.runtime)


def _launch(cfg: PipelineConfig, kind: str, what: str, inputs: dict[str, Any], nproc: int) -> dict[str, Any]:
    logger.info("%s: %s on %d local processes (runtime.generation_processes)", kind, what, nproc)
    from llm_trm_core.lm import release_shared_language_model

    release_shared_language_model()  # the ranks load their own copies: GPU 0 need not hold this one too
    launch_stage(ENTRY, cfg, nproc, args=("units", kind), inputs=inputs)
    logger.info("%s: %s committed by %d local processes", kind, what, nproc)
    return {"kind": kind, "processes": nproc, **{k: v for k, v in inputs.items() if k in ("first", "end", "part")}}


def shard_count(cfg: PipelineConfig, problems: dict[str, Any]) -> int:
    from llm_trm_core.stages.datagen import plan_shards

    return len(plan_shards(cfg, min(cfg.datagen.num_problems, int(problems["metrics"]["total"]))))


def shards_committed(cfg: PipelineConfig, problems: dict[str, Any], first: int, end: int) -> bool:
    """Whether every datagen shard of range `first`..`end`-1 is committed to the store already."""
    from llm_trm_core.datagen.artifacts import SHARD_STAGE
    from llm_trm_core.stages.datagen import plan_shards, shard_key

    manifest = Manifest.model_validate(problems)
    store = ArtifactStore(cfg.store.root)
    specs = plan_shards(cfg, min(cfg.datagen.num_problems, int(manifest.metrics["total"])))[first:end]
    return all(store.read_manifest(SHARD_STAGE, shard_key(cfg, manifest, s)) is not None for s in specs)


def spread_shards(
    cfg: PipelineConfig, problems: dict[str, Any], first: int = 0, end: int | None = None
) -> dict[str, Any] | None:
    """Datagen shards `first`..`end`-1 (every one from `first` when `end` is None) over the local processes."""
    nproc = processes(cfg)
    if nproc <= 1:
        return None
    end = shard_count(cfg, problems) if end is None else end
    if shards_committed(cfg, problems, first, end):
        return None
    inputs = {"problems": problems, "first": first, "end": end}
    return _launch(cfg, "datagen", f"shards {first}..{end - 1}", inputs, nproc)


def spread_hiddens(cfg: PipelineConfig, part: int = 0, parts: int = 1) -> dict[str, Any] | None:
    """Part `part` of `parts` of the corpus hidden-state pass (all of it by default) over the local processes
    (none when the `hiddens` artifact is committed)."""
    from llm_trm_core.stages.keys import key_for

    nproc = processes(cfg)
    if nproc <= 1 or ArtifactStore(cfg.store.root).read_manifest("hiddens", key_for(cfg, "hiddens")) is not None:
        return None
    return _launch(cfg, "hiddens", f"hidden-state part {part + 1} of {parts}", {"part": part, "parts": parts}, nproc)


def _evaluation_manifests(inputs: dict[str, Any]) -> dict[str, Manifest | None]:
    return {name: None if value is None else Manifest.model_validate(value) for name, value in inputs.items()}


def evaluation_committed(cfg: PipelineConfig, inputs: dict[str, Any], first: int, end: int) -> bool:
    """Whether the evaluation of `inputs` (its upstream manifests by argument name: problems, compressor, trm,
    latent[, grpo, before]) is committed, or every chunk of `first`..`end`-1 is."""
    from llm_trm_core.stages.evaluate import STAGE, evaluation_upstream
    from llm_trm_core.stages.keys import key_for
    from llm_trm_core.training.checkpoints import CheckpointManager

    store = ArtifactStore(cfg.store.root)
    key = key_for(cfg, STAGE, evaluation_upstream(**_evaluation_manifests(inputs)))  # type: ignore[arg-type]
    if store.read_manifest(STAGE, key) is not None:
        return True
    steps = set(CheckpointManager(store, STAGE, key).complete_steps())
    return all(chunk + 1 in steps for chunk in range(first, end))


def spread_evaluation(
    cfg: PipelineConfig, inputs: dict[str, Any], first: int = 0, end: int | None = None
) -> dict[str, Any] | None:
    """Evaluation chunks `first`..`end`-1 (every one from `first` when `end` is None) of the evaluation of
    `inputs` over the local processes."""
    nproc = processes(cfg)
    if nproc <= 1:
        return None
    if end is None:
        from llm_trm_core.stages.evaluate import evaluation_chunk_count

        problems = Manifest.model_validate(inputs["problems"])
        end = evaluation_chunk_count(cfg, ArtifactStore(cfg.store.root), problems)
    if evaluation_committed(cfg, inputs, first, end):
        return None
    what = f"evaluation chunks {first}..{end - 1}"
    return _launch(cfg, "evaluate", what, {"manifests": inputs, "first": first, "end": end}, nproc)


def run_share(cfg: PipelineConfig, kind: str, inputs: dict[str, Any], share: tuple[int, int]) -> dict[str, Any]:
    """One rank's share (`share` = (rank, ranks)) of the units a spread_* function launched: each committed
    as the one-process path commits it, those committed already skipped. Returns what was done."""
    store = ArtifactStore(cfg.store.root)
    if kind == "datagen":
        from llm_trm_core.stages.graph import datagen_shard_range, plain_call

        done = datagen_shard_range(plain_call(store), cfg, int(inputs["first"]), int(inputs["end"]), share)
        return {"kind": kind, "share": list(share), "shards": sorted(k for k in done if k != "problems")}
    if kind == "hiddens":
        from llm_trm_core.stages.compressor import run_corpus_hidden_units

        return {"kind": kind, "share": list(share),
                **run_corpus_hidden_units(cfg, store, int(inputs["part"]), int(inputs["parts"]), share)}  # fmt: skip
    if kind == "evaluate":
        from llm_trm_core.stages.evaluate import run_evaluate_chunks

        m = _evaluation_manifests(inputs["manifests"])
        missing = [name for name in ("problems", "compressor", "trm", "latent") if m.get(name) is None]
        if missing:
            raise UserError(f"units evaluate needs the upstream manifests {', '.join(missing)}")
        done = run_evaluate_chunks(
            cfg, store, m["problems"], m["compressor"], m["trm"], m["latent"],  # type: ignore[arg-type]
            int(inputs["first"]), int(inputs["end"]), grpo=m.get("grpo"), before=m.get("before"), share=share,
        )  # fmt: skip
        return {"kind": kind, "share": list(share), **done}
    raise UserError(f"unknown kind of units {kind!r}; choose one of: {', '.join(KINDS)}")
