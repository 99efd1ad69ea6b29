"""The pipeline graph, written once: which stage runs on which artifacts, for every command.

Each function takes a `Call` that runs one stage by its task name and returns its manifest (as JSON):
the Prefect flows pass one that runs the stage's cached Prefect task (`flows/chain.py`), the command
line without Prefect (`llm-trm stage`, torchrun workers, tests) passes `plain_call`, which runs the
declared run function in this process. Every run function returns at once when its artifact is
already committed, so a command re-runs only what is missing.

A declared stage that no command below wires by hand (a new stage, `tests/toy_stage.py`) runs through
`through(call, cfg, name)`: its declared upstream stages first (each by its own command when it has
one), then the stage on their manifests, in its declared order.

A command's docstring opens with its help line (`llm-trm <command> --help`). This module imports no
stage module at load (the CLI reads `COMMANDS` before a bad store is refused, without torch): the
helpers the graph needs are imported where they are used.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import ConfigError
from llm_trm_core.stages.declaration import stage, stage_of_task
from llm_trm_core.store import ArtifactStore, Manifest

logger = logging.getLogger(__name__)

Manifests = dict[str, dict[str, Any]]


class Call(Protocol):
    def __call__(self, task: str, cfg: PipelineConfig, /, *inputs: Any, **options: Any) -> dict[str, Any]: ...


def stage1a(call: Call, cfg: PipelineConfig) -> Manifests:
    hiddens = corpus_hiddens(call, cfg)
    basis = call("basis", cfg, hiddens)
    return {"hiddens": hiddens, "basis": basis, "compressor-1a": call("compressor", cfg, hiddens, basis, phase="1a")}


@runtime_checkable
class ShardFanout(Protocol):
    """A `Call` that can also run ranges of datagen shards as separate runs on other workers (the Prefect
    call, flows/chain.py): `fan_out_shards` returns once every range has committed its shards."""

    def fan_out_shards(self, cfg: PipelineConfig, problems: dict[str, Any], ranges: list[tuple[int, int]]) -> None: ...


@runtime_checkable
class HiddensFanout(Protocol):
    """A `Call` that can run the corpus hidden-state pass as `parts` runs on other workers (flows/chain.py)."""

    def fan_out_hiddens(self, cfg: PipelineConfig, parts: int) -> None: ...


@runtime_checkable
class EvaluationFanout(Protocol):
    """A `Call` that can run ranges of evaluation chunks as runs on other workers (flows/chain.py): `inputs`
    are the evaluation's upstream manifests by argument name (problems, compressor, trm, latent[, grpo, before])."""

    def fan_out_evaluation(
        self, cfg: PipelineConfig, inputs: dict[str, Any], ranges: list[tuple[int, int]]
    ) -> None: ...


def _spreads(call: Call) -> bool:
    """Whether the graph may first spread generation work over this machine's processes for `call`
    (llm_trm_core/stages/spread.py): the Prefect call and `plain_call` run the stages; a call that only
    records them (`stages_of`) or a test's stand-in does not."""
    return bool(getattr(call, "spreads_locally", False))


def _fans_out(call: Call, cfg: PipelineConfig, setting: str, kind: type) -> bool:
    """Whether `runtime.<setting>` is set and `call` can fan out (else a warning: the work runs here)."""
    deployment = getattr(cfg.runtime, setting)
    if deployment is None:
        return False
    if isinstance(call, kind):
        return True
    logger.warning(
        "runtime.%s=%s applies to the Prefect flows only: the work runs in this process", setting, deployment
    )
    return False


def corpus_hiddens(call: Call, cfg: PipelineConfig) -> dict[str, Any]:
    """The corpus hidden states; with `runtime.fanout_hiddens_deployment` and a call that can fan out, the
    pass's units are first computed by `runtime.fanout_workers` runs on other workers, else by this
    machine's GPUs (`runtime.generation_processes`, llm_trm_core/stages/spread.py)."""
    from llm_trm_core.stages.spread import spread_hiddens

    if _fans_out(call, cfg, "fanout_hiddens_deployment", HiddensFanout):
        call.fan_out_hiddens(cfg, cfg.runtime.fanout_workers)  # type: ignore[attr-defined]
    elif _spreads(call):
        spread_hiddens(cfg)
    return call("hiddens", cfg)


def evaluation_chunk_count(cfg: PipelineConfig, problems: dict[str, Any]) -> int:
    """The chunks the evaluation of `problems` decodes (no model loaded)."""
    from llm_trm_core.stages.evaluate import evaluation_chunk_count as count

    return count(cfg, ArtifactStore(cfg.store.root), Manifest.model_validate(problems))


def evaluation(call: Call, task: str, cfg: PipelineConfig, *policy: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Evaluation task `task` on `policy` (problems, compressor, trm, latent); with
    `runtime.fanout_evaluate_deployment` and a call that can fan out, its chunks are first decoded by
    `runtime.fanout_workers` range runs on other workers, else by this machine's GPUs
    (`runtime.generation_processes`, llm_trm_core/stages/spread.py), and the task then finds them committed."""
    from llm_trm_core.stages.spread import spread_evaluation

    inputs = dict(zip(("problems", "compressor", "trm", "latent"), policy, strict=True)) | options
    if _fans_out(call, cfg, "fanout_evaluate_deployment", EvaluationFanout):
        count = evaluation_chunk_count(cfg, policy[0])
        call.fan_out_evaluation(cfg, inputs, shard_ranges(count, cfg.runtime.fanout_workers))  # type: ignore[attr-defined]
    elif _spreads(call):
        spread_evaluation(cfg, inputs)
    return call(task, cfg, *policy, **options)


def _shard_specs(cfg: PipelineConfig, problems: dict[str, Any]) -> list[Any]:
    from llm_trm_core.stages.datagen import plan_shards

    return plan_shards(cfg, min(cfg.datagen.num_problems, int(problems["metrics"]["total"])))


def shard_ranges(shards: int, parts: int) -> list[tuple[int, int]]:
    """Shard indexes 0..`shards`-1 cut into at most `parts` contiguous ranges [first, end) of near-equal size."""
    parts = max(1, min(parts, shards))
    bounds = [round(i * shards / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def stage2_data(call: Call, cfg: PipelineConfig, problems: dict[str, Any]) -> dict[str, Any]:
    """Datagen: one task per shard (resumable), then the report.

    With `runtime.fanout_deployment` and a call that can fan out, the shards are first run as
    `runtime.fanout_workers` ranges on other workers, else over this machine's GPUs
    (`runtime.generation_processes`, llm_trm_core/stages/spread.py); the shard tasks below then find them
    committed."""
    from llm_trm_core.stages.spread import spread_shards

    specs = _shard_specs(cfg, problems)
    if _fans_out(call, cfg, "fanout_deployment", ShardFanout):
        call.fan_out_shards(cfg, problems, shard_ranges(len(specs), cfg.runtime.fanout_workers))  # type: ignore[attr-defined]
    elif _spreads(call):
        spread_shards(cfg, problems, 0, len(specs))
    shards = [call("datagen-shard", cfg, problems, s.index, s.start, s.end) for s in specs]
    return call("datagen-report", cfg, problems, shards)


def datagen_shard_range(
    call: Call, cfg: PipelineConfig, first: int, end: int | None = None, share: tuple[int, int] = (0, 1)
) -> Manifests:
    """Datagen shards `first`..`end`-1 (all from `first` when `end` is None), each committed as its own artifact:
    the unit of work of one fanned-out run (`stage2_data`). `share` = (rank, ranks): only every ranks-th shard
    of the range from its rank-th (one local process's share, llm_trm_core/stages/spread.py)."""
    from llm_trm_core.launch import share_of

    problems = call("problems", cfg)
    specs = _shard_specs(cfg, problems)
    if not specs[first:end]:
        raise ConfigError(f"shard range {first}..{end} is empty: this config has shards 0..{len(specs) - 1}")
    out: Manifests = {"problems": problems}
    for s in share_of(specs[first:end], share):
        out[f"datagen-shard-{s.index:04d}"] = call("datagen-shard", cfg, problems, s.index, s.start, s.end)
    return out


def stage1b(call: Call, cfg: PipelineConfig, compressor_1a: dict[str, Any], datagen: dict[str, Any]) -> Manifests:
    traces = call("trace-hiddens", cfg, datagen)
    basis = call("basis", cfg, traces)
    tuned = call("compressor", cfg, traces, basis, phase="1b", init=compressor_1a)
    return {"trace-hiddens": traces, "trace-basis": basis, "compressor-1b": tuned}


def compressor(call: Call, cfg: PipelineConfig, phase: str = "1a") -> Manifests:
    """Stage 1: train the tied linear compressor D -> D' (hidden states cached, closed form and/or SGD).

    1a: corpus hidden states -> closed-form basis -> the configured compressor; 1b: also thinking traces
    (datagen) and the 1a compressor fine-tuned on them."""
    out = stage1a(call, cfg)
    if phase == "1b":
        problems = call("problems", cfg)
        datagen = stage2_data(call, cfg, problems)
        out.update({"problems": problems, "datagen": datagen, **stage1b(call, cfg, out["compressor-1a"], datagen)})
    return out


def sweep(call: Call, cfg: PipelineConfig) -> Manifests:
    """Stage 1 sweep: closed-form and SGD compressors for every D' in sweep.d_primes, plus a report.

    One closed-form and one SGD compressor per D' below the hidden size, then the comparison report."""
    from llm_trm_core.stages.compressor import with_compressor
    from llm_trm_core.stages.sweep import sweep_points

    hiddens = corpus_hiddens(call, cfg)
    basis = call("basis", cfg, hiddens)
    points = [
        call("compressor", with_compressor(cfg, d_prime=d, solver=solver), hiddens, basis)
        for d, solver in sweep_points(cfg, int(hiddens["metrics"]["hidden_size"]))
    ]
    return {"hiddens": hiddens, "basis": basis, "sweep": call("sweep-report", cfg, points)}


def datagen(call: Call, cfg: PipelineConfig) -> Manifests:
    """Stage 2 data: generate thinking traces and record consistent (pre, post) hidden states."""
    problems = call("problems", cfg)
    return {"problems": problems, "datagen": stage2_data(call, cfg, problems)}


def through_pairs(call: Call, cfg: PipelineConfig) -> Manifests:
    """Stage 2 data: compress the (pre, post) states with the 1b compressor into Parquet shards.

    problems -> 1a -> datagen -> 1b -> pairs (compressed with the 1b compressor)."""
    out: Manifests = {"problems": call("problems", cfg)}
    out.update(stage1a(call, cfg))
    out["datagen"] = stage2_data(call, cfg, out["problems"])
    out.update(stage1b(call, cfg, out["compressor-1a"], out["datagen"]))
    out["pairs"] = call("pairs", cfg, out["datagen"], out["compressor-1b"])
    return out


def through_trm(call: Call, cfg: PipelineConfig) -> Manifests:
    """Stage 2 model: train the TRM on the compressed pairs and report it beside baselines (held-out test)."""
    out = through_pairs(call, cfg)
    out["trm"] = call("trm", cfg, out["pairs"], out["compressor-1b"])
    return out


def through_latent(call: Call, cfg: PipelineConfig) -> Manifests:
    """Train the injection of TRM output into the LM (k latent input embeddings) on answer likelihood."""
    out = through_trm(call, cfg)
    out["latent"] = call("latent", cfg, out["problems"], out["compressor-1b"], out["trm"])
    return out


def _policy(out: Manifests) -> tuple[dict[str, Any], ...]:
    return out["problems"], out["compressor-1b"], out["trm"], out["latent"]


def through_evaluate(call: Call, cfg: PipelineConfig) -> Manifests:
    """End-task accuracy on held-out problems: no-think, think, TRM-latent, random-latent, original-style."""
    out = through_latent(call, cfg)
    out["evaluate"] = evaluation(call, "evaluate", cfg, *_policy(out))
    return out


def through_grpo(call: Call, cfg: PipelineConfig) -> Manifests:
    """Stage 3: GRPO on answer correctness (TRM + projection through the frozen LM), evaluated before and after.

    ... -> latent -> evaluate (before) -> grpo -> evaluate (after, with the before/after table)."""
    from llm_trm_core.stages.grpo import grpo_problem_config

    out = through_latent(call, cfg)
    out["evaluate-before"] = evaluation(call, "evaluate-before-grpo", cfg, *_policy(out))
    out["grpo-problems"] = call("problems", grpo_problem_config(cfg))
    out["grpo"] = call("grpo", cfg, out["grpo-problems"], *_policy(out)[1:])
    out["evaluate"] = evaluation(
        call, "evaluate-after-grpo", cfg, *_policy(out), grpo=out["grpo"], before=out["evaluate-before"]
    )
    return out


def pipeline(call: Call, cfg: PipelineConfig) -> Manifests:
    """Run every stage that exists, end to end, each cached by its store key.

    The GRPO graph (`through_grpo`): its results hold every stage's manifest in graph order."""
    return through_grpo(call, cfg)


def help_line(command: str) -> str:
    """The help line of graph command `command`: the first paragraph of its docstring."""
    graph = compressor if command == "compressor-1b" else COMMANDS[command]
    return (inspect.getdoc(graph) or "").split("\n\n")[0]


Command = Callable[[Call, PipelineConfig], Manifests]
# command -> the graph it runs; `llm_trm_core.plan.COMMAND_STAGES` names the stages each one checks
COMMANDS: dict[str, Command] = {
    "compressor": compressor,
    "compressor-1b": lambda call, cfg: compressor(call, cfg, "1b"),
    "sweep": sweep,
    "datagen": datagen,
    "pairs": through_pairs,
    "trm": through_trm,
    "latent": through_latent,
    "evaluate": through_evaluate,
    "grpo": through_grpo,
    "pipeline": pipeline,
}
# the result a command is about (the CLI's one JSON line without Prefect)
TARGETS = {"compressor": "compressor-1a", "compressor-1b": "compressor-1b", "pipeline": "evaluate"}


def through(call: Call, cfg: PipelineConfig, name: str) -> Manifests:
    """A declared stage after its declared upstream stages: by a command above when one exists, else generic."""
    if name in COMMANDS:
        return COMMANDS[name](call, cfg)
    if name == "hiddens":  # fanned out or spread over local GPUs first, as in every command
        return {"hiddens": corpus_hiddens(call, cfg)}
    declared = stage(name)
    out: Manifests = {}
    for upstream in declared.upstream:
        if upstream not in out:
            out.update(through(call, cfg, upstream))
    out[name] = call(declared.task_names[0], cfg, *(out[u] for u in declared.upstream))
    return out


def target_of(name: str) -> str:
    return TARGETS.get(name, name)


class _AnyCount(dict[str, Any]):
    """Stand-in metrics: every count (problems in the set, the model's hidden size) is large."""

    def __missing__(self, key: str) -> int:
        return 1 << 20


def stages_of(cfg: PipelineConfig, name: str) -> tuple[str, ...]:
    """The declared stages command or stage `name` runs on `cfg`, in the order it first calls them: its
    graph run with a call that records each stage and returns a stand-in manifest (nothing runs).
    `llm_trm_core/plan.py` `COMMAND_STAGES` must agree (tests/test_declarations.py)."""
    seen: dict[str, None] = {}

    def record(task: str, cfg: PipelineConfig, /, *inputs: Any, **options: Any) -> dict[str, Any]:
        declared = stage_of_task(task)
        if declared is None:
            raise KeyError(f"no declared stage runs task {task!r}")
        seen[declared.name] = None
        return {"stage": declared.name, "key": task, "uri": "", "upstream": {}, "metrics": _AnyCount()}

    through(record, cfg, name)
    return tuple(seen)


# ---------------------------------------------------------------------------------------------
# Without Prefect


def _as_manifests(value: Any) -> Any:
    if isinstance(value, dict) and "stage" in value and "key" in value:
        return Manifest.model_validate(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_as_manifests(v) for v in value]
    return value


StageHook = Callable[[str, PipelineConfig, Callable[[], Manifest]], Manifest]


class PlainCall:
    """A `Call` that runs each stage's declared run function in this process.

    `hook(stage, cfg, run)` (tests) wraps every stage run: it must call `run()` and return its manifest.
    """

    spreads_locally = True  # generation work may go to this machine's other GPUs first (`_spreads`)

    def __init__(self, store: ArtifactStore, hook: StageHook | None = None) -> None:
        self.store, self.hook = store, hook

    def __call__(self, task: str, cfg: PipelineConfig, /, *inputs: Any, **options: Any) -> dict[str, Any]:
        declared = stage_of_task(task)
        if declared is None or declared.run is None:
            raise KeyError(f"no declared stage runs task {task!r}")
        run = declared.run
        args = [_as_manifests(v) for v in inputs]
        kwargs = {k: _as_manifests(v) for k, v in options.items()}

        def once() -> Manifest:
            return run(cfg, self.store, *args, **kwargs)

        manifest = self.hook(declared.name, cfg, once) if self.hook else once()
        return manifest.model_dump(mode="json")


def plain_call(store: ArtifactStore, hook: StageHook | None = None) -> Call:
    """A `Call` that runs each stage's declared run function in this process (`PlainCall`)."""
    return PlainCall(store, hook)


def run_plain(cfg: PipelineConfig, name: str, hook: StageHook | None = None) -> Manifests:
    """Command or declared stage `name` with everything upstream of it, in this process (no Prefect)."""
    return through(plain_call(ArtifactStore(cfg.store.root), hook), cfg, name)


def run_compressor_distributed(cfg: PipelineConfig) -> tuple[Manifest, int, bool]:
    """A 1a compressor on every torchrun rank: the main process makes the hidden states and the basis, then
    every process trains (SGD) its share. Returns the manifest, the world size and whether this is rank 0."""
    from llm_trm_core.stages.compressor import run_basis, run_compressor, run_corpus_hiddens
    from llm_trm_core.stages.keys import key_for
    from llm_trm_core.training.accel import get_accelerator

    store = ArtifactStore(cfg.store.root)
    accelerator = get_accelerator(cfg.runtime.device, cfg.compressor.mixed_precision)
    if accelerator.is_main_process:
        run_basis(cfg, store, run_corpus_hiddens(cfg, store))
    accelerator.wait_for_everyone()
    hiddens = store.read_manifest("hiddens", key_for(cfg, "hiddens"))
    assert hiddens is not None
    basis = store.read_manifest("basis", key_for(cfg, "basis", {"hiddens": hiddens.key}))
    assert basis is not None
    manifest = run_compressor(cfg, store, hiddens, basis, accelerator=accelerator)
    return manifest, accelerator.num_processes, accelerator.is_main_process
