"""Stage `grpo`: GRPO on answer correctness for the latent policy (frozen LM + TRM + projection).

Starts from the latent stage's policy; the reference policy is that starting point, frozen. Trains on the
train split of `grpo.problems` (default: the pipeline's problems) and checks greedy accuracy before and
after on its test split, beside the no-latent LM on the same problems. Checkpoints every
`grpo.checkpoint_every` steps; a killed run resumes from the newest one and ends identical to an
uninterrupted run (every random draw is seeded by step). The artifact holds the trained weights, the
per-step metrics (also in the manifest), a reward-curve plot and a before/after report.

    llm-trm stage grpo --preset tiny --store URI [key=value ...]      (without Prefect)
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.answers import grade
from llm_trm_core.data.problems import Problem, read_problems
from llm_trm_core.errors import UserError
from llm_trm_core.grpo.learner import GRPOLearner
from llm_trm_core.grpo.rewards import RewardFunction, correctness_reward, format_reward, reward_name
from llm_trm_core.grpo.train import train_grpo
from llm_trm_core.latent.artifacts import add_lora, build_reasoner, check_lineage, load_latent
from llm_trm_core.latent.reasoner import Arm, LatentReasoner, PromptBatch
from llm_trm_core.lm.prefix import KEPT_PREFIX_BYTES
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.keys import stage_config
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.stats import Comparison, change_row, compare, derangement
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.training.schedules import lr_multiplier, make_scheduler

logger = logging.getLogger(__name__)

STAGE = "grpo"
CHECK_ARMS: tuple[Arm, ...] = ("no_latent", "trm_latent", "mean_latent", "shuffled_latent")
CHECK_COLUMNS = ("arm", "before", "after", "change", "change_ci_low", "change_ci_high", "n")


def grpo_problem_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config whose `problems` section is the set GRPO trains on."""
    if cfg.grpo.problems is None:
        return cfg
    return cfg.model_copy(update={"problems": cfg.grpo.problems})


class HeldoutCheck:
    """Greedy correctness on the held-out problems of every check arm, before and after training.

    The LM is frozen, so the prompts' states (the TRM's inputs) and their KV caches do not change during
    training: the check encodes its prompts once (test questions and the train questions of the mean control)
    and its second run reuses them, with their caches up to `KEPT_PREFIX_BYTES` (a prompt cache is only used
    while no LoRA adapter is loaded: `LatentReasoner.prompt_prefix`). Without adapters the no-latent arm is
    the plain LM, the same before and after: its answers are reused (`lm_unchanged`)."""

    def __init__(
        self, reasoner: LatentReasoner, train: Sequence[Problem], test: Sequence[Problem], max_new_tokens: int,
        batch_size: int, seed: int,
    ) -> None:  # fmt: skip
        self.reasoner, self.test, self.max_new_tokens, self.seed = reasoner, list(test), max_new_tokens, seed
        self.batch_size = batch_size
        self.mean_questions = [p.question for p in train[: len(test)]]
        self.chunks = [self.test[i : i + batch_size] for i in range(0, len(self.test), batch_size)]
        self._mean_batches: list[PromptBatch] = []
        self._test_batches: list[PromptBatch] = []
        self._no_latent: list[bool] | None = None

    def _encoded(self) -> tuple[list[PromptBatch], list[PromptBatch]]:
        if not self._test_batches:
            encode = self.reasoner.encode_prompts
            size = self.batch_size
            self._mean_batches = [
                encode(self.mean_questions[i : i + size]) for i in range(0, len(self.mean_questions), size)
            ]
            self._test_batches = [encode([p.question for p in chunk]) for chunk in self.chunks]
            kept = 0
            for batch in (*self._test_batches, *self._mean_batches):
                size_bytes = batch.prefix.nbytes if batch.prefix is not None else 0
                if kept + size_bytes > KEPT_PREFIX_BYTES:
                    batch.prefix = None  # prefilled again when used
                kept += size_bytes if batch.prefix is not None else 0
        return self._mean_batches, self._test_batches

    @torch.no_grad()
    def run(self, lm_unchanged: bool = False) -> dict[str, list[bool]]:
        """Correctness per problem of every check arm with the reasoner's current weights: the controls are
        refitted (mean output over the first len(test) train questions, derangement of the test outputs).
        Each chunk's arms decode together from one prefill. `lm_unchanged`: reuse the no-latent answers of
        the previous run (the LM has not changed since)."""
        reasoner = self.reasoner
        mean_batches, test_batches = self._encoded()
        reasoner.mean_output = reasoner.trm_outputs_of(mean_batches).mean(0)
        outputs = reasoner.trm_outputs_of(test_batches)
        shuffled = outputs[derangement(len(self.test), self.seed)]
        reused = self._no_latent if lm_unchanged else None
        arms = [arm for arm in CHECK_ARMS if not (reused is not None and arm == "no_latent")]
        tok = reasoner.lm.tokenizer
        correct: dict[str, list[bool]] = {arm: [] for arm in arms}
        start = 0
        for chunk, batch in zip(self.chunks, test_batches, strict=True):
            rows = slice(start, start + len(chunk))
            latents: dict[str, torch.Tensor | None] = {
                arm: reasoner.arm_latents(arm, len(chunk), (shuffled if arm == "shuffled_latent" else outputs)[rows])
                for arm in arms
            }
            answers, _ = reasoner.generate_arms(batch, latents, self.max_new_tokens)
            for arm in arms:
                correct[arm] += [
                    grade(str(tok.decode(ids, skip_special_tokens=True)), p.answer_value).numeric
                    for p, ids in zip(chunk, answers[arm], strict=True)
                ]
            start += len(chunk)
        if reused is not None:
            correct["no_latent"] = list(reused)
        self._no_latent = correct["no_latent"]
        return {arm: correct[arm] for arm in CHECK_ARMS}


def _plot(history: list[dict[str, Any]]) -> bytes:
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    reward = np.asarray([h["reward_mean"] for h in history])
    window = max(1, min(5, len(reward)))
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
    axes[0].plot(steps, reward, ".", alpha=0.5, label="reward (batch mean)")
    axes[0].plot(steps[window - 1 :], smooth, "-", label=f"moving mean ({window})")
    axes[0].plot(steps, [h["accuracy"] or 0.0 for h in history], "-", alpha=0.6, label="accuracy")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[0].set_title("reward")
    if any(h["kl"] is not None for h in history):  # measured only with grpo.beta > 0
        axes[1].plot(steps, [h["kl"] for h in history], label="KL to reference (k3)")
    axes[1].plot(steps, [h["clip_fraction"] for h in history], label="clip fraction")
    axes[1].plot(steps, [h["skipped_fraction"] for h in history], label="skipped groups")
    axes[1].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[2].plot(steps, [h["entropy"] for h in history], label="entropy (nats/token)")
    axes[2].plot(steps, [h["completion_length"] / 10 for h in history], label="answer length / 10")
    axes[2].legend(fontsize=7)
    axes[2].set_xlabel("step")
    png = png_bytes(fig)
    plt.close(fig)
    return png


def run_grpo(
    cfg: PipelineConfig,
    store: ArtifactStore,
    problems: Manifest,
    compressor: Manifest,
    trm: Manifest,
    latent: Manifest,
    rewards: Sequence[tuple[RewardFunction, float]] | None = None,
) -> Manifest:
    """`problems` is the GRPO problem set (see grpo_problem_config). `rewards` replaces the configured
    reward functions (tests); the default is correctness (+ grpo.format_reward x format)."""
    g = cfg.grpo
    reward_functions: list[tuple[RewardFunction, float]] = list(
        rewards or [(correctness_reward, 1.0), *([(format_reward, g.format_reward)] if g.format_reward else [])]
    )
    extra = {"rewards": [[reward_name(f), w] for f, w in reward_functions]}
    upstream = {"problems": problems.key, "compressor": compressor.key, "trm": trm.key, "latent": latent.key}
    key, manifest = cached(cfg, store, STAGE, upstream, extra)
    if manifest is not None:
        return manifest
    check_lineage(trm, compressor, store, latent)
    started = time.perf_counter()
    problem_set = read_problems(store, problems)
    train, test = problem_set.split("train"), problem_set.select_split("test", g.eval_problems)
    if not train or not test:
        raise UserError(
            f"the GRPO problem set has no train or test problems ({problem_set.counts()}); "
            "raise grpo.problems.num_generated"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        policy = load_latent(store, latent, build_reasoner(cfg, store, compressor, trm))
    if g.lora_rank and "lora.safetensors" in store.open(latent.stage, latent.key).manifest.files:
        raise UserError(
            "grpo.lora_rank > 0 needs a latent stage without LoRA (the reference policy is the LM with adapters "
            "off); set latent.lora_rank=0 or grpo.lora_rank=0"
        )
    reference = LatentReasoner(
        policy.lm, policy.compressor, copy.deepcopy(policy.trm).requires_grad_(False),
        copy.deepcopy(policy.projector).requires_grad_(False), policy.layer_index, policy.n_steps,
        policy.drop_system_prefix,
    )  # fmt: skip
    policy.trm.train(False).requires_grad_(g.train_trm)
    policy.trm.halt_head.requires_grad_(False)  # the policy runs every supervision step: halting is unused
    policy.projector.requires_grad_(g.train_projector)
    params = [p for p in (*policy.trm.parameters(), *policy.projector.parameters()) if p.requires_grad]
    lora_params = add_lora(policy, g.lora_rank, g.lora_alpha, g.lora_targets) if g.lora_rank else []
    params += lora_params
    optimizer = torch.optim.AdamW(params, lr=g.lr, weight_decay=g.weight_decay)
    scheduler = make_scheduler(optimizer, lr_multiplier("constant", g.steps, g.warmup_steps))
    learner = GRPOLearner(
        policy, reference, g, params, optimizer, scheduler, reward_functions, cfg.runtime.seed,
        reference_adapters_off=bool(lora_params),
    )  # fmt: skip
    checkpoints = CheckpointManager(store, STAGE, key)
    batch_size = g.micro_batch  # held-out questions per chunk; its arms decode together

    check = HeldoutCheck(policy, train, test, g.max_completion_tokens, batch_size, cfg.runtime.seed)

    def check_before() -> dict[str, list[bool]]:
        before = check.run()
        logger.info("grpo before: %s", {a: float(np.mean(v)) for a, v in before.items()})
        return before

    tracker = Tracker(cfg.tracking, "grpo", key, stage_config(cfg, STAGE, extra))
    trained = train_grpo(
        learner, train, before=check_before, lora=bool(lora_params), checkpoints=checkpoints, tracker=tracker
    )
    after = check.run(lm_unchanged=not lora_params)  # a resumed run re-encodes and re-decodes every arm
    reps = cfg.evaluate.bootstrap
    rows = [
        change_row(arm, trained.before[arm], after[arm], reps, cfg.runtime.seed)
        for arm in CHECK_ARMS
        if arm in trained.before
    ]
    versus = [
        compare("trm_latent", after["trm_latent"], arm, after[arm], reps, cfg.runtime.seed)
        for arm in CHECK_ARMS
        if arm != "trm_latent"
    ]
    history = trained.history
    head = history[: max(1, len(history) // 4)]
    tail = history[-max(1, len(history) // 4) :]
    summary = {
        "reward_first_quarter": float(np.mean([h["reward_mean"] for h in head])),
        "reward_last_quarter": float(np.mean([h["reward_mean"] for h in tail])),
        "reward_rate": float(np.mean([h["reward_mean"] for h in history])),
        "skipped_fraction": float(np.mean([h["skipped_fraction"] for h in history])),
        "steps_updated": sum(1 for h in history if h["updated"]),
    }
    report = _report(cfg, rows, summary, history, len(train), versus)
    tracker.summary({f"grpo/{k}": v for k, v in summary.items()})
    tracker.finish()
    with stage_writer(cfg, store, STAGE, key, upstream, extra) as w:
        w.write_bytes("trm.safetensors", _tensors(policy.trm.state_dict()))
        w.write_bytes("projector.safetensors", _tensors(policy.projector.state_dict()))
        w.write_json("projector.json", policy.projector.config)
        if lora_params:
            w.write_bytes("lora.safetensors", _tensors(policy.lm.model.get_adapter_state_dict()))
            w.write_json("lora.json", {"rank": g.lora_rank, "alpha": g.lora_alpha, "targets": g.lora_targets})
        w.write_json("history.json", history)
        w.write_json("heldout_answers.json", {"before": trained.before, "after": after})
        w.write_bytes("rewards.png", _plot(history))
        w.write_bytes("report.md", report.encode())
        manifest = w.commit(
            {
                "heldout": rows,
                "heldout_comparisons_after": [c.row() for c in versus],
                **summary,
                "history": history,
                "train_problems": len(train),
                "heldout_problems": len(test),
                "problem_source": problem_set.problems[0].id.split("-")[0],
                "resumed_from": trained.resumed_from,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    checkpoints.clear()
    return manifest


def _tensors(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})


def _report(
    cfg: PipelineConfig,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    n_train: int,
    versus: Sequence[Comparison] = (),
) -> str:
    g = cfg.grpo
    steps = [
        {k: h[k] for k in ("step", "reward_mean", "reward_std", "accuracy", "skipped_groups", "kl", "clip_fraction",
                           "entropy", "completion_length")}
        for h in history
    ]  # fmt: skip
    return (
        f"# GRPO: {len(history)} steps x {g.questions_per_step} questions x G={g.group_size}\n\n"
        f"Trained on {n_train} train problems; loss {g.loss_type}, rewards scaled by {g.scale_rewards}, "
        f"beta {g.beta}, clip [1-{g.epsilon_low}, 1+{g.epsilon_high or g.epsilon_low}], "
        f"temperature {g.temperature}.\n\n"
        f"Reward rate over the run: {summary['reward_rate']:.3f} (first quarter {summary['reward_first_quarter']:.3f}, "
        f"last quarter {summary['reward_last_quarter']:.3f}); {summary['skipped_fraction']:.0%} of groups had no "
        f"reward variance and were skipped; {summary['steps_updated']}/{len(history)} steps updated the policy.\n\n"
        "## Held-out check (greedy, test split of the GRPO problem set)\n\n"
        + markdown_table(rows, CHECK_COLUMNS)
        + "\n\nchange_ci = 95% paired bootstrap interval of (after - before) over the same problems.\n\n"
        + (
            "After GRPO, trm_latent against each control (paired bootstrap, same problems):\n\n"
            + markdown_table([c.row() for c in versus])
            + "\n\n"
            + "".join(f"- {c.sentence()}\n" for c in versus)
            + "\n"
            if versus
            else ""
        )
        + "## Per-step metrics\n\n"
        + markdown_table(steps)
        + "\n"
    )
