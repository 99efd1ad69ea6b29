"""Stage `latent`: train the injection of TRM output into the LM on answer likelihood.

For training problems, the no-think prompt's states go through the compressor and the TRM; the
projection turns the TRM output into k input embeddings placed after the prompt; the loss is the
cross-entropy of the gold answer (`#### N` + end of turn) teacher-forced after them, through the
frozen LM. Trained: the projection (and the TRM with `latent.train_trm`), by
`llm_trm_core/latent/train.py` in the shared training loop (checkpoints between batches, exact resume).
The artifact holds the projection (and TRM) as safetensors + config, the TRM's mean output over the
training questions (the mean_latent control's vector, reused by the evaluation) with the TRM inputs it was
computed from (so the evaluation after GRPO refits it for GRPO's TRM without running the LM), and
validation answer NLL per token with TRM latents vs every control.
"""

from __future__ import annotations

import logging
import time

import torch
from safetensors.torch import save as save_safetensors

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.problems import read_problems
from llm_trm_core.errors import UserError
from llm_trm_core.latent.artifacts import build_reasoner, check_lineage
from llm_trm_core.latent.train import encode_training_prompts, train_latent, validation_nll
from llm_trm_core.plan import latent_val_count
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.training.checkpoints import CheckpointManager

logger = logging.getLogger(__name__)

STAGE = "latent"


def run_latent(
    cfg: PipelineConfig, store: ArtifactStore, problems: Manifest, compressor: Manifest, trm: Manifest
) -> Manifest:
    upstream = {"problems": problems.key, "compressor": compressor.key, "trm": trm.key}
    key, manifest = cached(cfg, store, STAGE, upstream)
    if manifest is not None:
        return manifest
    check_lineage(trm, compressor, store)
    start_time = time.perf_counter()
    lat = cfg.latent
    problem_set = read_problems(store, problems)
    train = problem_set.select_split("train", lat.num_problems)
    val = problem_set.select_split("val", latent_val_count(lat))
    if not train or not val:
        raise UserError(
            f"the problem set has no train/val problems for the latent stage ({problem_set.counts()}); "
            "raise problems.val_fraction or the problem set's size"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        reasoner = build_reasoner(cfg, store, compressor, trm)
    checkpoints = CheckpointManager(store, STAGE, key)
    prompts = encode_training_prompts(reasoner, train, lat)
    result = train_latent(reasoner, train, lat, seed=cfg.runtime.seed, checkpoints=checkpoints, prompts=prompts)

    with torch.no_grad():  # mean_latent's vector, and its TRM inputs for a TRM trained later (GRPO) to refit it
        if prompts is not None:  # the kept encodings hold both: nothing runs again
            mean_inputs, mean_output = prompts.trm_inputs(), prompts.mean_output()
            reasoner.mean_output = mean_output
        else:
            mean_inputs = reasoner.trm_inputs([p.question for p in train], lat.batch_size)
            mean_output = reasoner.fit_mean_output_from(mean_inputs, lat.batch_size)
        val_nll = validation_nll(reasoner, val, lat.batch_size, cfg.runtime.seed)
    del prompts
    projector_bytes = save_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in reasoner.projector.state_dict().items()}
    )
    with stage_writer(cfg, store, STAGE, key, upstream) as w:
        w.write_bytes("projector.safetensors", projector_bytes)
        w.write_json("projector.json", reasoner.projector.config)
        if result.lora:
            adapter: dict[str, torch.Tensor] = reasoner.lm.model.get_adapter_state_dict()
            weights = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
            w.write_bytes("lora.safetensors", save_safetensors(weights))
            w.write_json("lora.json", {"rank": lat.lora_rank, "alpha": lat.lora_alpha, "targets": lat.lora_targets})
        if lat.train_trm:
            w.write_bytes(
                "trm.safetensors",
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in reasoner.trm.state_dict().items()}),
            )
        w.write_json("history.json", result.history)
        w.write_bytes("mean_output.safetensors", save_safetensors({"mean_output": mean_output.cpu()}))
        w.write_bytes("mean_inputs.safetensors", mean_inputs.to_bytes())
        manifest = w.commit(
            {
                "val_answer_nll": val_nll,
                "train_problems": len(train),
                "val_problems": len(val),
                "k": lat.num_latents,
                "trained": " + ".join(
                    [
                        "projection",
                        *(["TRM"] if lat.train_trm else []),
                        *([f"LoRA r={lat.lora_rank}"] if result.lora else []),
                    ]
                ),
                "batches": result.batches,
                "resumed_from": result.resumed_from,
                "final_train_loss": result.history[-1]["loss"] if result.history else None,
                "seconds": round(time.perf_counter() - start_time, 2),
            }
        )
    checkpoints.clear()
    return manifest
