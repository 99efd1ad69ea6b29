"""Training the injection of TRM output into the LM on answer likelihood (the `latent` stage's loop).

For training problems, the no-think prompt's states go through the compressor and the TRM; the
projection turns the TRM output into k input embeddings placed after the prompt; the loss is the
cross-entropy of the gold answer (`#### N` + end of turn) teacher-forced after them, through the
frozen LM. Trained: the projection (and the TRM with `latent.train_trm`, LoRA adapters with
`latent.lora_rank`). Runs in the shared training loop (llm_trm_core/training/loop.py): checkpoints
between batches, exact resume, a non-finite loss raises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llm_trm_core.config import LatentConfig
from llm_trm_core.data.problems import Problem
from llm_trm_core.latent.artifacts import add_lora, trained_modules
from llm_trm_core.latent.reasoner import Arm, LatentReasoner, TrmInputs
from llm_trm_core.lm.prefix import KEPT_PREFIX_BYTES, PromptPrefix, forward_suffix
from llm_trm_core.stats import derangement
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.training.loop import Progress, TrainLoop, TrainState
from llm_trm_core.training.schedules import lr_multiplier, make_scheduler

logger = logging.getLogger(__name__)

VAL_ARMS: tuple[Arm, ...] = ("trm_latent", "random_latent", "mean_latent", "shuffled_latent", "no_latent")


def answer_text(value: float) -> str:
    return f"#### {int(value) if float(value).is_integer() else value}"


def problem_batches(problems: list[Problem], size: int, seed: int | None, epoch: int) -> Iterator[list[Problem]]:
    """Batches of `size` problems; with a seed, in a permutation seeded by (seed, epoch)."""
    order = list(range(len(problems)))
    if seed is not None:
        order = torch.randperm(
            len(problems), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ).tolist()
    for start in range(0, len(order), size):
        yield [problems[i] for i in order[start : start + size]]


def gold_answers(reasoner: LatentReasoner, problems: list[Problem]) -> list[list[int]]:
    """The token ids of `#### N<eos>` per problem."""
    tok = reasoner.lm.tokenizer
    return [[*tok(answer_text(p.answer_value), add_special_tokens=False).input_ids, tok.eos_token_id] for p in problems]


def nll_after(
    reasoner: LatentReasoner, prefix: PromptPrefix, latents: torch.Tensor | None, answers: list[list[int]]
) -> torch.Tensor:
    """Mean cross-entropy per answer token of `answers` teacher-forced after the cached prompt and `latents`,
    with the LM head applied only where an answer token is predicted."""
    model = reasoner.lm.model
    hidden, starts = forward_suffix(model, prefix, latents, answers)
    head = model.get_output_embeddings()
    losses = []
    for row, answer in enumerate(answers):
        logits = head(hidden[row, starts[row] - 1 : starts[row] - 1 + len(answer)]).float()
        losses.append(F.cross_entropy(logits, torch.tensor(answer, device=logits.device), reduction="sum"))
    return torch.stack(losses).sum() / sum(len(a) for a in answers)


def answer_nll(
    reasoner: LatentReasoner,
    problems: list[Problem],
    arm: Arm,
    generator: torch.Generator | None = None,
    outputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy per answer token of `#### N<eos>` after the arm's latents (differentiable);
    `outputs`: the permuted TRM outputs of the shuffled_latent arm."""
    batch = reasoner.encode_prompts([p.question for p in problems])
    model = reasoner.lm.model
    # the prompt once without gradients unless LoRA adapters train (they change the prompt's states)
    prefix = reasoner.prompt_prefix(batch, grad=any(p.requires_grad for p in model.parameters()))
    return nll_after(
        reasoner, prefix, reasoner.latents(batch, arm, generator, outputs), gold_answers(reasoner, problems)
    )


@dataclass
class EncodedPrompts:
    """The training questions run once through the frozen LM and the frozen TRM: each question's prompt cache
    (unpadded) and TRM output (raw scale, CPU), by problem id. Valid while neither changes: no LoRA adapters,
    `latent.train_trm` off. Encoded in the training set's order in batches of `batch_size`, the same batches
    `LatentReasoner.fit_mean_output` makes, so the mean output is the same to the bit, and a resumed run
    encodes exactly what an uninterrupted one did."""

    prefixes: dict[str, PromptPrefix]
    outputs: dict[str, torch.Tensor]
    order: list[str]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # each question's TRM input (L_i, D')

    def mean_output(self) -> torch.Tensor:
        return torch.stack([self.outputs[i] for i in self.order]).mean(0)

    def trm_inputs(self) -> TrmInputs:
        """The TRM inputs of the training questions, in order: the mean output's, for a later TRM."""
        return TrmInputs([self.inputs[i] for i in self.order])

    def answer_nll(self, reasoner: LatentReasoner, problems: list[Problem]) -> torch.Tensor:
        """`answer_nll` of the trm_latent arm from the kept encodings (differentiable in the projector)."""
        prefix = PromptPrefix.stack([self.prefixes[p.id] for p in problems])
        outputs = torch.stack([self.outputs[p.id] for p in problems])
        latents = reasoner.arm_latents("trm_latent", len(problems), outputs)
        return nll_after(reasoner, prefix, latents, gold_answers(reasoner, problems))


@torch.no_grad()
def encode_training_prompts(reasoner: LatentReasoner, train: list[Problem], lat: LatentConfig) -> EncodedPrompts | None:
    """The training prompts encoded once for every epoch (docs/performance.md), or None when they cannot be
    kept: the LM or the TRM trains, the problem ids repeat, or the caches would exceed KEPT_PREFIX_BYTES."""
    if lat.train_trm or lat.lora_rank or len({p.id for p in train}) != len(train):
        return None
    reasoner.trm.train(False)  # as in training and validation: no dropout in the TRM's outputs
    kept = EncodedPrompts({}, {}, [p.id for p in train])
    held = 0
    for start in range(0, len(train), lat.batch_size):
        chunk = train[start : start + lat.batch_size]
        batch = reasoner.encode_prompts([p.question for p in chunk])
        if batch.prefix is None:
            return None
        outputs = reasoner.trm_output(batch).float().cpu()
        inputs = TrmInputs.of(batch).pieces
        for row, problem in enumerate(chunk):
            kept.prefixes[problem.id] = batch.prefix.unpadded(row)
            kept.outputs[problem.id] = outputs[row]
            kept.inputs[problem.id] = inputs[row]
            held += kept.prefixes[problem.id].nbytes
        if start == 0 and held / len(chunk) * len(train) > KEPT_PREFIX_BYTES:
            logger.info(
                "latent: the training prompts' caches would exceed %d bytes: encoded per batch", KEPT_PREFIX_BYTES
            )
            return None
    logger.info("latent: %d training prompts encoded once (%.0f MiB of prompt cache)", len(train), held / 2**20)
    return kept


@torch.no_grad()
def validation_nll(reasoner: LatentReasoner, val: list[Problem], batch_size: int, seed: int) -> dict[str, float]:
    """Answer NLL per token on val for the TRM latents and every control (docs/evaluation.md): random
    directions of matched norm, the TRM's training-mean output (mean_latent: `reasoner.mean_output`, set by
    the caller), other questions' TRM outputs (shuffled_latent, seeded derangement), and no latents. Each val
    batch is encoded, run through the TRM and prefilled once; every arm continues from that prefill."""
    chunks = list(problem_batches(val, batch_size, None, 0))
    batches = [reasoner.encode_prompts([p.question for p in chunk]) for chunk in chunks]
    outputs = torch.cat([reasoner.trm_output(batch).float().cpu() for batch in batches])
    shuffled = outputs[derangement(len(val), seed)]
    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(VAL_ARMS, 0.0)
    start = 0
    for chunk, batch in zip(chunks, batches, strict=True):
        prefix, answers = reasoner.prompt_prefix(batch), gold_answers(reasoner, chunk)
        rows = slice(start, start + len(chunk))
        for arm in VAL_ARMS:
            own = (shuffled if arm == "shuffled_latent" else outputs)[rows]
            latents = reasoner.arm_latents(arm, len(chunk), own, generator)
            totals[arm] += float(nll_after(reasoner, prefix, latents, answers)) * len(chunk)
        start += len(chunk)
    return {arm: total / len(val) for arm, total in totals.items()}


@dataclass
class LatentResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # {"batch", "loss"} per batch
    batches: int = 0
    lora: bool = False  # LoRA adapters were attached and trained
    resumed_from: int | None = None


def train_latent(
    reasoner: LatentReasoner,
    train: list[Problem],
    lat: LatentConfig,
    *,
    seed: int,
    checkpoints: CheckpointManager | None = None,
    prompts: EncodedPrompts | None = None,
) -> LatentResult:
    """Train the projection (+ TRM, + LoRA as configured) in place on answer NLL of the training problems
    (`prompts`: their kept encodings, from `encode_training_prompts`, else each batch is encoded)."""
    reasoner.trm.requires_grad_(lat.train_trm)
    reasoner.trm.train(False)
    params = list(reasoner.projector.parameters()) + (list(reasoner.trm.parameters()) if lat.train_trm else [])
    lora_params = add_lora(reasoner, lat.lora_rank, lat.lora_alpha, lat.lora_targets) if lat.lora_rank else []
    params += lora_params
    optimizer = torch.optim.AdamW(params, lr=lat.lr, weight_decay=lat.weight_decay)
    steps_total = lat.epochs * math.ceil(len(train) / lat.batch_size)
    scheduler = make_scheduler(optimizer, lr_multiplier("cosine", steps_total, lat.warmup_steps))
    models = trained_modules(reasoner, trm=lat.train_trm, lora=bool(lora_params))
    progress = Progress()
    loop = TrainLoop(
        "latent",
        TrainState(models, optimizer, scheduler, progress),
        lr_name="latent.lr",
        checkpoints=checkpoints,
        checkpoint_every=lat.checkpoint_every,
        checkpoint_unit="batch",
        total_steps=steps_total,
    )
    loop.resume()

    def step(batch: list[Problem], index: int) -> None:
        loss = answer_nll(reasoner, batch, "trm_latent") if prompts is None else prompts.answer_nll(reasoner, batch)
        loop.finite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, lat.grad_clip)
        optimizer.step()
        scheduler.step()
        progress.history.append({"batch": progress.batches + 1, "loss": loss.item()})
        logger.info("latent batch %d/%d: answer NLL %.4f", progress.batches + 1, steps_total, loss.item())
        loop.updated({"loss": loss.item()})

    def end_of_epoch() -> None:
        logger.info("latent epoch %d: last loss %.4f", progress.epoch, progress.history[-1]["loss"])

    loop.run_epochs(lat.epochs, lambda epoch: problem_batches(train, lat.batch_size, seed, epoch), step, end_of_epoch)
    return LatentResult(
        history=progress.history,
        batches=progress.batches,
        lora=bool(lora_params),
        resumed_from=loop.resumed_from,
    )
