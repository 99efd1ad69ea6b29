"""Stage `latent`: train the injection of TRM output into the LM on answer likelihood.

For training problems, the no-think prompt's states go through the compressor and the TRM; the
projection turns the TRM output into k input embeddings placed after the prompt; the loss is the
cross-entropy of the gold answer (`#### N` + end of turn) teacher-forced after them, through the
frozen LM. Trained: the projection (and the TRM with `latent.train_trm`). Checkpoints between batches
resume exactly; the artifact holds the projection (and TRM) as safetensors + config, and validation
answer NLL per token with TRM latents vs random latents of matched norm vs no latents.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.problems import Problem
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import resolve_layer
from llm_trm_core.latent.reasoner import Arm, LatentProjector, LatentReasoner, embedding_rms
from llm_trm_core.lm import LoadedLM, load_language_model
from llm_trm_core.plan import latent_val_count
from llm_trm_core.stages.compressor import load_compressor
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, key_for, stage_config
from llm_trm_core.stages.problems import read_problems
from llm_trm_core.stages.trm import load_trm
from llm_trm_core.stats import derangement
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.training.schedules import lr_multiplier, make_scheduler

logger = logging.getLogger(__name__)

STAGE = "latent"


def answer_text(value: float) -> str:
    return f"#### {int(value) if float(value).is_integer() else value}"


def check_lineage(trm: Manifest, compressor: Manifest, store: ArtifactStore, latent: Manifest | None = None) -> None:
    """The TRM must have been trained on pairs made with this compressor (and the latent stage for this TRM)."""
    if latent is not None and latent.upstream.get("trm") != trm.key:
        raise UserError(
            f"the latent artifact {latent.uri} was trained for TRM {latent.upstream.get('trm')}, not {trm.key}"
        )
    pairs = store.read_manifest("pairs", trm.upstream.get("pairs", ""))
    if pairs is None or pairs.upstream.get("compressor") != compressor.key:
        raise UserError(
            f"the TRM {trm.uri} was not trained on pairs compressed by {compressor.uri}: its compressor is "
            f"{pairs.upstream.get('compressor') if pairs else 'unknown'}. "
            "Use the TRM and compressor of one pipeline run."
        )


def build_reasoner(
    cfg: PipelineConfig, store: ArtifactStore, compressor: Manifest, trm: Manifest, lm: LoadedLM | None = None
) -> LatentReasoner:
    lm = lm or load_language_model(cfg.model, cfg.runtime)
    comp = load_compressor(store, compressor)
    if comp.hidden_size != lm.info.hidden_size:
        raise UserError(
            f"the compressor {compressor.uri} maps D={comp.hidden_size} but {lm.info.name} has "
            f"D={lm.info.hidden_size}: the TRM and compressor belong to another language model"
        )
    model = load_trm(store, trm)
    projector = LatentProjector(comp.d_prime, lm.info.hidden_size, cfg.latent.num_latents, embedding_rms(lm))
    layer = resolve_layer(cfg.compressor.layer, lm.info.num_layers)
    return LatentReasoner(lm, comp, model, projector, layer, cfg.trm.n_supervision, cfg.pairs.pre_positions != "all")


def add_lora(reasoner: LatentReasoner, rank: int, alpha: int, targets: list[str]) -> list[torch.nn.Parameter]:
    """Attach LoRA adapters to the LM (transformers' peft integration); returns their parameters."""
    from peft import LoraConfig

    model: Any = reasoner.lm.model
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    try:
        model.add_adapter(config)
    except ValueError as exc:
        raise UserError(f"cannot attach LoRA to {reasoner.lm.info.name}: {exc}; check latent.lora_targets") from None
    return [p for name, p in model.named_parameters() if "lora_" in name]


def load_latent(store: ArtifactStore, manifest: Manifest, reasoner: LatentReasoner) -> LatentReasoner:
    artifact = store.open(manifest.stage, manifest.key)
    if "lora.safetensors" in artifact.manifest.files:
        from peft import set_peft_model_state_dict

        lora = json.loads(artifact.read_bytes("lora.json"))
        add_lora(reasoner, lora["rank"], lora["alpha"], lora["targets"])
        set_peft_model_state_dict(reasoner.lm.model, load_safetensors(artifact.read_bytes("lora.safetensors")))
    config = json.loads(artifact.read_bytes("projector.json"))
    projector = LatentProjector(config["d_prime"], config["hidden_size"], config["k"], config["embed_rms"])
    projector.load_state_dict(load_safetensors(artifact.read_bytes("projector.safetensors")))
    reasoner.projector = projector.eval()
    if "trm.safetensors" in artifact.manifest.files:
        reasoner.trm.load_state_dict(load_safetensors(artifact.read_bytes("trm.safetensors")))
    return reasoner


def _batches(problems: list[Problem], size: int, seed: int | None, epoch: int) -> Iterator[list[Problem]]:
    order = list(range(len(problems)))
    if seed is not None:
        order = torch.randperm(
            len(problems), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ).tolist()
    for start in range(0, len(order), size):
        yield [problems[i] for i in order[start : start + size]]


def answer_nll(
    reasoner: LatentReasoner,
    problems: list[Problem],
    arm: Arm,
    generator: torch.Generator | None = None,
    outputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy per answer token of `#### N<eos>` after the arm's latents (differentiable);
    `outputs`: the permuted TRM outputs of the shuffled_latent arm."""
    tok = reasoner.lm.tokenizer
    batch = reasoner.encode_prompts([p.question for p in problems])
    answers = [
        [*tok(answer_text(p.answer_value), add_special_tokens=False).input_ids, tok.eos_token_id] for p in problems
    ]
    embeds, mask, starts = reasoner.input_embeddings(
        batch.ids, reasoner.latents(batch, arm, generator, outputs), answers
    )
    logits = reasoner.lm.model(inputs_embeds=embeds, attention_mask=mask).logits
    losses = []
    for row, answer in enumerate(answers):
        positions = torch.arange(starts[row] - 1, starts[row] - 1 + len(answer), device=logits.device)
        target = torch.tensor(answer, device=logits.device)
        losses.append(F.cross_entropy(logits[row, positions].float(), target, reduction="sum"))
    return torch.stack(losses).sum() / sum(len(a) for a in answers)


VAL_ARMS: tuple[Arm, ...] = ("trm_latent", "random_latent", "mean_latent", "shuffled_latent", "no_latent")


@torch.no_grad()
def validation_nll(
    reasoner: LatentReasoner, train: list[Problem], val: list[Problem], batch_size: int, seed: int
) -> dict[str, float]:
    """Answer NLL per token on val for the TRM latents and every control (docs/evaluation.md): random
    directions of matched norm, the TRM's training-mean output (mean_latent), other questions' TRM outputs
    (shuffled_latent, seeded derangement), and no latents."""
    reasoner.fit_mean_output([p.question for p in train], batch_size)
    outputs = reasoner.trm_outputs([p.question for p in val], batch_size)
    shuffled = outputs[derangement(len(val), seed)]
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for arm in VAL_ARMS:
        total = 0.0
        for start, b in zip(range(0, len(val), batch_size), _batches(val, batch_size, None, 0), strict=True):
            permuted = shuffled[start : start + len(b)] if arm == "shuffled_latent" else None
            total += float(answer_nll(reasoner, b, arm, generator, permuted)) * len(b)
        out[arm] = total / len(val)
    return out


def run_latent(
    cfg: PipelineConfig, store: ArtifactStore, problems: Manifest, compressor: Manifest, trm: Manifest
) -> Manifest:
    upstream = {"problems": problems.key, "compressor": compressor.key, "trm": trm.key}
    key = key_for(cfg, STAGE, upstream)
    if (manifest := store.read_manifest(STAGE, key)) is not None:
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
    reasoner.trm.requires_grad_(lat.train_trm)
    reasoner.trm.train(False)
    params = list(reasoner.projector.parameters()) + (list(reasoner.trm.parameters()) if lat.train_trm else [])
    lora_params = add_lora(reasoner, lat.lora_rank, lat.lora_alpha, lat.lora_targets) if lat.lora_rank else []
    params += lora_params
    lora_names = {id(p): n for n, p in reasoner.lm.model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW(params, lr=lat.lr, weight_decay=lat.weight_decay)
    steps_total = lat.epochs * math.ceil(len(train) / lat.batch_size)
    scheduler = make_scheduler(optimizer, lr_multiplier("cosine", steps_total, lat.warmup_steps))
    checkpoints = CheckpointManager(store, STAGE, key)
    progress: dict[str, Any] = {"epoch": 0, "batch": 0, "batches": 0, "history": []}
    resumed_from = None
    if (latest := checkpoints.load_latest()) is not None:
        resumed_from, saved = latest
        checkpoints.restore(reasoner.projector, saved["projector"], resumed_from)
        if lat.train_trm:
            checkpoints.restore(reasoner.trm, saved["trm"], resumed_from)
        if lora_params:
            reasoner.lm.model.load_state_dict(saved["lora"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        progress = saved["progress"]

    while progress["epoch"] < lat.epochs:
        for index, batch in enumerate(_batches(train, lat.batch_size, cfg.runtime.seed, progress["epoch"])):
            if index < progress["batch"]:
                continue
            loss = answer_nll(reasoner, batch, "trm_latent")
            if not torch.isfinite(loss):
                raise UserError(f"the latent training loss became {loss.item()}; lower latent.lr (now {lat.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, lat.grad_clip)
            optimizer.step()
            scheduler.step()
            progress["batch"], progress["batches"] = index + 1, progress["batches"] + 1
            progress["history"].append({"batch": progress["batches"], "loss": loss.item()})
            logger.info("latent batch %d/%d: answer NLL %.4f", progress["batches"], steps_total, loss.item())
            if progress["batches"] % lat.checkpoint_every == 0:
                checkpoints.save(
                    progress["batches"],
                    {
                        "projector": reasoner.projector.state_dict(),
                        "trm": reasoner.trm.state_dict() if lat.train_trm else {},
                        "lora": {lora_names[id(p)]: p.detach().cpu() for p in lora_params},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "progress": progress,
                    },
                )
        progress["epoch"] += 1
        progress["batch"] = 0
        logger.info("latent epoch %d: last loss %.4f", progress["epoch"], progress["history"][-1]["loss"])

    with torch.no_grad():
        val_nll = validation_nll(reasoner, train, val, lat.batch_size, cfg.runtime.seed)
    projector_bytes = save_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in reasoner.projector.state_dict().items()}
    )
    with store.writer(
        STAGE, key, config=stage_config(cfg, STAGE), code_version=STAGE_CODE_VERSIONS[STAGE], upstream=upstream
    ) as w:
        w.write_bytes("projector.safetensors", projector_bytes)
        w.write_json("projector.json", reasoner.projector.config)
        if lora_params:
            adapter: dict[str, torch.Tensor] = reasoner.lm.model.get_adapter_state_dict()
            weights = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
            w.write_bytes("lora.safetensors", save_safetensors(weights))
            w.write_json("lora.json", {"rank": lat.lora_rank, "alpha": lat.lora_alpha, "targets": lat.lora_targets})
        if lat.train_trm:
            w.write_bytes(
                "trm.safetensors",
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in reasoner.trm.state_dict().items()}),
            )
        w.write_json("history.json", progress["history"])
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
                        *([f"LoRA r={lat.lora_rank}"] if lora_params else []),
                    ]
                ),
                "batches": progress["batches"],
                "resumed_from": resumed_from,
                "final_train_loss": progress["history"][-1]["loss"] if progress["history"] else None,
                "seconds": round(time.perf_counter() - start_time, 2),
            }
        )
    checkpoints.clear()
    return manifest
