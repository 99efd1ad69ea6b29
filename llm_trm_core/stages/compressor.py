"""Stage 1: compressor. Three cached artifacts, each computed once:

- `hiddens`    the LM's hidden states of the text corpus (train / val / test documents), run once;
- `basis`      the exact tied-autoencoder solution (eigenbasis of the second moment), one pass;
- `compressor` one D' with its solver (closed form, SGD, or SGD from the closed form), phase 1a
               (text) or 1b (thinking traces, starting from a 1a artifact), and held-out metrics
               beside baselines (the training mean, and the random orthogonal init).

Also runnable under torchrun / accelerate launch for multi-process SGD:
    torchrun --nproc_per_node 2 -m llm_trm_core.stages.compressor --preset tiny --store URI [k=v ...]
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import torch
from accelerate import Accelerator
from safetensors.torch import save as save_safetensors

from llm_trm_core.compressor.artifacts import (
    BASIS_FILE,
    BASIS_META_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_basis,
    load_compressor,
    open_hiddens,
)
from llm_trm_core.compressor.moments import Basis, MomentAccumulator, solve
from llm_trm_core.compressor.train import SGDResult, train_sgd
from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.corpus import iter_corpus
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import (
    HiddenStates,
    chunk_documents,
    resolve_layer,
)
from llm_trm_core.lm import LoadedLM, shared_language_model
from llm_trm_core.metrics import ReconstructionMetrics
from llm_trm_core.models.compressor import LinearCompressor, check_compatible
from llm_trm_core.stages.keys import key_for, stage_config
from llm_trm_core.stages.publish import StateUnits, cached, stage_writer, write_states_artifact
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.accel import get_accelerator
from llm_trm_core.training.checkpoints import CheckpointManager

logger = logging.getLogger(__name__)

Phase = Literal["1a", "1b"]


# ---------------------------------------------------------------------------------------------
# hiddens


def _corpus_units(cfg: PipelineConfig, store: ArtifactStore, key: str) -> tuple[LoadedLM, StateUnits, int]:
    lm = shared_language_model(cfg.model, cfg.runtime)
    chunks, n_docs = chunk_documents(
        iter_corpus(cfg.corpus), lm.tokenizer, cfg.corpus.max_tokens, cfg.corpus.max_doc_tokens
    )
    if not chunks:
        raise UserError(
            f"the corpus ({cfg.corpus.source}, {n_docs} documents) produced no text to run the model on; "
            "check corpus.source and corpus.num_documents"
        )
    return lm, StateUnits.of(cfg, store, "hiddens", key, chunks), n_docs


def run_corpus_hiddens(cfg: PipelineConfig, store: ArtifactStore) -> Manifest:
    """Run the LM once over the corpus; store every real token's hidden state (padding excluded). The pass is
    committed unit by unit (`compressor.hidden_unit_sequences`): a rerun computes only the missing units."""
    stage = "hiddens"
    key, manifest = cached(cfg, store, stage)
    if manifest is not None:
        return manifest
    lm, units, n_docs = _corpus_units(cfg, store, key)
    manifest = write_states_artifact(
        cfg, store, stage, key, lm, units.chunks, metrics={"documents": n_docs}, units=units
    )
    units.checkpoints.clear()
    return manifest


def run_corpus_hidden_units(
    cfg: PipelineConfig, store: ArtifactStore, part: int, parts: int, share: tuple[int, int] = (0, 1)
) -> dict[str, Any]:
    """Part `part` of `parts` of the corpus hidden-state pass: its contiguous range of units (graph
    `shard_ranges`), each committed unless it is already; the unit of work of one fanned-out run. `share` =
    (rank, ranks): only every ranks-th unit of the part from its rank-th (one local process's share,
    llm_trm_core/stages/spread.py). The `hiddens` task then finds them committed and writes the artifact.
    Returns what was done."""
    from llm_trm_core.launch import share_of
    from llm_trm_core.stages.graph import shard_ranges

    if not 0 <= part < parts:
        raise UserError(f"hidden-state part {part} of {parts} does not exist: parts are 0..{parts - 1}")
    key, manifest = cached(cfg, store, "hiddens")
    if manifest is not None:
        return {"key": key, "units": [], "computed": [], "committed": True}
    lm, units, _ = _corpus_units(cfg, store, key)
    ranges = shard_ranges(len(units.bounds), parts)
    chosen = share_of(range(*ranges[part]), share) if part < len(ranges) else []  # more parts than units: none
    computed = units.compute(lm, resolve_layer(cfg.compressor.layer, lm.info.num_layers), chosen)
    return {"key": key, "units": chosen, "computed": computed, "committed": False}


# ---------------------------------------------------------------------------------------------
# basis (closed form)


def run_basis(cfg: PipelineConfig, store: ArtifactStore, hiddens: Manifest) -> Manifest:
    """One streaming pass over the training states: count, Σx, Σxxᵀ (float64), then eigh."""
    stage = "basis"
    key, manifest = cached(cfg, store, stage, {"hiddens": hiddens.key})
    if manifest is not None:
        return manifest
    start = time.perf_counter()
    states = open_hiddens(store, hiddens)
    moments = MomentAccumulator(states.hidden_size)
    for rows in states.iter_rows("train"):
        moments.update(rows)
    basis = solve(moments, cfg.compressor.centered)
    tensors = {"components": basis.components, "eigenvalues": basis.eigenvalues, "mean": basis.mean}
    with stage_writer(cfg, store, stage, key, {"hiddens": hiddens.key}) as writer:
        writer.write_bytes(BASIS_FILE, save_safetensors(tensors))
        writer.write_json(BASIS_META_FILE, {"count": basis.count, "centered": basis.centered})
        return writer.commit(
            {
                "tokens": basis.count,
                "seconds": round(time.perf_counter() - start, 2),
                "top_eigenvalue": float(basis.eigenvalues[0]),
            }
        )


# ---------------------------------------------------------------------------------------------
# compressor


@torch.no_grad()
def evaluate_compressor(
    model: LinearCompressor,
    states: HiddenStates,
    basis: Basis,
    split: str,
    lm_head_tokens: int,
    extra_baselines: dict[str, LinearCompressor] | None = None,
) -> dict[str, Any]:
    """Held-out metrics of the model and of the baselines (mean, random init, any extra) on the same tokens."""
    head = states.lm_head()
    mean = basis.mean.to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random baseline whatever the run's seed
        random_init = LinearCompressor(model.hidden_size, model.d_prime)
    predictors: dict[str, Any] = {
        "model": model.eval(),
        "baseline_mean": lambda x: mean.expand_as(x),
        "baseline_random_init": random_init,
        **{f"baseline_{name}": m.eval() for name, m in (extra_baselines or {}).items()},
    }
    trackers = {name: ReconstructionMetrics(basis.mean, head, lm_head_tokens) for name in predictors}
    for rows in states.iter_rows(split):
        x = rows.to(model.weight.device)
        for name, predict in predictors.items():
            trackers[name].update(x, predict(x))
    return {name: tracker.compute() for name, tracker in trackers.items()}


def compressor_key(
    cfg: PipelineConfig, hiddens: Manifest, basis: Manifest, phase: Phase, init: Manifest | None
) -> tuple[str, dict[str, str]]:
    upstream = {"hiddens": hiddens.key, "basis": basis.key}
    if init is not None:
        upstream["init"] = init.key
    return key_for(cfg, "compressor", upstream, {"phase": phase}), upstream


def run_compressor(
    cfg: PipelineConfig,
    store: ArtifactStore,
    hiddens: Manifest,
    basis: Manifest,
    *,
    phase: Phase = "1a",
    init: Manifest | None = None,
    accelerator: Accelerator | None = None,
) -> Manifest:
    """Fit one compressor; returns its manifest (computed once per key)."""
    stage = "compressor"
    c = cfg.compressor
    key, upstream = compressor_key(cfg, hiddens, basis, phase, init)
    if (manifest := store.read_manifest(stage, key)) is not None:
        return manifest
    if phase == "1b" and init is None:
        raise UserError("compressor phase 1b starts from a 1a compressor: pass its manifest as `init`")
    states = open_hiddens(store, hiddens)
    hidden_size = states.hidden_size
    closed = load_basis(store, basis)
    uses_sgd = c.solver in ("sgd", "closed_form+sgd") or phase == "1b"  # 1b fine-tunes the 1a weights
    accelerator = accelerator or (get_accelerator(cfg.runtime.device, c.mixed_precision) if uses_sgd else None)
    is_main = accelerator is None or accelerator.is_main_process

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        model = LinearCompressor(hidden_size, c.d_prime, centered=c.centered)
        if init is not None:
            start_from = load_compressor(store, init)
            check_compatible(start_from, hidden_size, f"the init compressor {init.uri}")
            if (start_from.d_prime, start_from.centered) != (c.d_prime, c.centered):
                raise UserError(
                    f"the init compressor has D'={start_from.d_prime}, centered={start_from.centered}; this run asks "
                    f"for D'={c.d_prime}, centered={c.centered}. Use matching compressor settings for 1a and 1b."
                )
            model.load_state_dict(start_from.state_dict())
        elif c.solver in ("closed_form", "closed_form+sgd"):
            model.set_weights(closed.weight(c.d_prime), closed.offset())

        extra_baselines: dict[str, LinearCompressor] = {}
        if init is not None:
            extra_baselines["init_1a"] = LinearCompressor.from_bytes(*model.to_bytes())
            exact = LinearCompressor(hidden_size, c.d_prime, centered=c.centered)
            exact.set_weights(closed.weight(c.d_prime), closed.offset())
            extra_baselines["closed_form_here"] = exact
        sgd: SGDResult | None = None
        tracker = None
        if uses_sgd:
            assert accelerator is not None
            if is_main:
                tracker = Tracker(cfg.tracking, f"compressor-{phase}-d{c.d_prime}", key, stage_config(cfg, stage))
            checkpoints = CheckpointManager(store, stage, key)
            sgd = train_sgd(
                model,
                states,
                c,
                seed=cfg.runtime.seed,
                accelerator=accelerator,
                checkpoints=checkpoints,
                tracker=tracker,
            )
            model.load_state_dict(sgd.weights)
        if not is_main:
            assert accelerator is not None
            accelerator.wait_for_everyone()
            manifest = store.read_manifest(stage, key)
            assert manifest is not None, "the main process did not commit the compressor"
            return manifest
        metrics = evaluate_compressor(model.cpu(), states, closed, "test", c.eval_lm_head_tokens, extra_baselines)

    weights, config_json = model.to_bytes()
    summary: dict[str, Any] = {
        "phase": phase,
        "solver": "sgd from 1a" if phase == "1b" else c.solver,
        "d_prime": c.d_prime,
        "hidden_size": hidden_size,
        "test": metrics["model"],
        "baselines": {k.removeprefix("baseline_"): v for k, v in metrics.items() if k != "model"},
        "energy_kept_closed_form": closed.explained(c.d_prime),
    }
    if sgd is not None:
        summary["sgd"] = {
            "steps": sgd.steps,
            "best_step": sgd.best_step,
            "best_val_mse": sgd.best_val_mse,
            "stopped_early": sgd.stopped_early,
            "resumed_from": sgd.resumed_from,
            "seconds": round(sgd.seconds, 2),
        }
    with stage_writer(cfg, store, stage, key, upstream, {"phase": phase}) as writer:
        writer.write_bytes(WEIGHTS_FILE, weights)
        writer.write_bytes(CONFIG_FILE, config_json)
        if sgd is not None:
            writer.write_json("history.json", sgd.history)
        manifest = writer.commit(summary)
    if tracker:
        tracker.summary({"test/" + k: v for k, v in metrics["model"].items()})
        tracker.finish()
    if uses_sgd:
        CheckpointManager(store, stage, key).clear()
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    return manifest


def with_compressor(cfg: PipelineConfig, **changes: Any) -> PipelineConfig:
    """A copy of cfg with compressor fields changed (frozen models)."""
    return cfg.model_copy(update={"compressor": cfg.compressor.model_copy(update=changes)})
