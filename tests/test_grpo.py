"""GRPO: the objective against hand-computed values, rewards, the latent policy's log-probs, a toy run
that must raise the reward, and the stage (cache, resume after SIGKILL, before/after report)."""

from __future__ import annotations

import math

import pytest
import torch

from llm_trm_core.grpo.objective import group_advantages, grpo_loss, k3_kl, zero_variance_groups
from llm_trm_core.grpo.rewards import combined_rewards, correctness_reward, format_reward
from tests.helpers.stage_cli import run_stage


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # group 1: mean 0.75, Bessel std 0.5; group 2: all equal
    scaled = group_advantages(rewards, 4, "group")  # TRL: (R - mean) / (std + 1e-4)
    torch.testing.assert_close(scaled[:4], torch.tensor([0.25, -0.75, 0.25, 0.25]) / (0.5 + 1e-4))
    torch.testing.assert_close(scaled[4:], torch.zeros(4))  # a flat group has no advantage, no NaN
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], torch.tensor([0.25, -0.75, 0.25, 0.25]))
    batch_std = float(rewards.std())
    torch.testing.assert_close(
        group_advantages(rewards, 4, "batch", eps=0.0)[:4], torch.tensor([0.25, -0.75, 0.25, 0.25]) / batch_std
    )
    assert zero_variance_groups(rewards, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def _two_token_logp(theta: torch.Tensor, answers: list[int]) -> torch.Tensor:
    logits = torch.stack([theta, torch.zeros_like(theta)])
    return logits.log_softmax(0)[answers].unsqueeze(1)  # (N, 1)


def test_on_policy_loss_is_zero_and_gradient_matches_hand_value() -> None:
    theta = torch.zeros((), requires_grad=True)
    logp = _two_token_logp(theta, [0, 0, 1, 1])
    adv = torch.tensor([0.5, -1.5, 0.5, 0.5])
    terms = grpo_loss(logp, logp.detach(), adv, torch.ones(4, 1), loss_type="grpo")
    assert float(terms.loss.detach()) == pytest.approx(0.0, abs=1e-7)
    terms.loss.backward()
    # dL/dtheta = -(1/4) [0.5*0.5 + (-1.5)*0.5 + 0.5*(-0.5) + 0.5*(-0.5)] = +0.25
    assert float(theta.grad) == pytest.approx(0.25, abs=1e-6)
    assert float(terms.clipped_tokens) == 0


def test_clipping_by_hand_and_asymmetric_clip() -> None:
    old = _two_token_logp(torch.tensor(0.0), [0, 1])
    theta = torch.tensor(0.5, requires_grad=True)
    new = _two_token_logp(theta, [0, 1])
    adv = torch.tensor([1.0, -1.0])
    # token 0: ratio 1.2449 -> 1.2, contributes -1.2; token 1: ratio 0.7551 -> 0.8, contributes +0.8
    terms = grpo_loss(new, old, adv, torch.ones(2, 1), loss_type="grpo")
    assert float(terms.loss.detach()) == pytest.approx(-0.2, abs=1e-6)
    terms.loss.backward()
    assert float(theta.grad) == pytest.approx(0.0, abs=1e-7)  # both tokens on the clipped branch
    assert float(terms.clipped_tokens) == 2
    # clip-higher 0.28: token 0 (ratio 1.2449 < 1.28) is no longer clipped
    high = grpo_loss(new.detach(), old, adv, torch.ones(2, 1), epsilon_high=0.28, loss_type="grpo")
    ratio0 = math.exp(0.5) / (1 + math.exp(0.5)) / 0.5
    assert float(high.loss) == pytest.approx((-ratio0 + 0.8) / 2, abs=1e-6)
    assert float(high.clipped_tokens) == 1


def test_k3_kl_by_hand() -> None:
    # d = ln(0.5/0.6) = -0.1823216; k3 = e^d - d - 1 = 0.8333333 + 0.1823216 - 1 = 0.0156549
    # (a hand calculation once printed 0.015649, a dropped digit: the arithmetic gives 0.0156549)
    logp = torch.log(torch.tensor([[0.6]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.5]], dtype=torch.float64))
    assert float(k3_kl(logp, ref)) == pytest.approx(0.0156549, abs=1e-7)
    terms = grpo_loss(logp, logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), ref_logp=ref, beta=0.1)
    assert float(terms.loss) == pytest.approx(0.00156549, abs=1e-8)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_token_vs_sequence_aggregation_and_micro_batches() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    old = logp - 0.1  # ratio e^0.1 = 1.105, inside the clip range
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    r = math.exp(0.1)
    # per token: -r on row 0 (3 tokens), +r on row 1 (1 token)
    assert float(grpo_loss(logp, old, adv, mask, loss_type="dapo").loss) == pytest.approx((-3 * r + r) / 4)
    assert float(grpo_loss(logp, old, adv, mask, loss_type="grpo").loss) == pytest.approx((-r + r) / 2, abs=1e-6)
    assert float(grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_len=5).loss) == pytest.approx(
        (-3 * r + r) / (2 * 5)
    )
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        whole = grpo_loss(logp, old, adv, mask, loss_type=loss_type, max_len=5).loss  # type: ignore[arg-type]
        parts = sum(
            grpo_loss(
                logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], loss_type=loss_type,  # type: ignore[arg-type]
                max_len=5, num_sequences=2, num_tokens=4.0,
            ).loss
            for i in range(2)
        )  # fmt: skip
        assert float(parts) == pytest.approx(float(whole), abs=1e-6)


def test_rewards_use_trl_signature_and_the_shared_answer_module() -> None:
    completions = ["#### 42", "The answer is 42.", "I think 41", "#### 7"]
    gold = [42.0, 42.0, 42.0, 42.0]
    assert correctness_reward(completions, answer_value=gold, prompts=["q"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 1.0]
    total, parts = combined_rewards([(correctness_reward, 1.0), (format_reward, 0.1)], completions, answer_value=gold)
    assert total == pytest.approx([1.1, 1.0, 0.0, 0.1])
    assert parts["format_reward"] == [1.0, 0.0, 0.0, 1.0]

    def not_applicable(completions, **_):  # TRL: None = not applicable
        return [None] * len(completions)

    assert all(math.isnan(v) for v in combined_rewards([(not_applicable, 1.0)], completions)[0])

    def only_first_two(completions, **_):
        return [1.0, 1.0, None, None]

    total, parts = combined_rewards([(only_first_two, 1.0), (format_reward, 0.5)], completions)
    assert total == pytest.approx([1.5, 1.0, 0.0, 0.5])  # None is left out of the sum, not scored 0
    total, _ = combined_rewards([(only_first_two, 1.0)], completions)
    assert total[:2] == [1.0, 1.0] and all(math.isnan(v) for v in total[2:])


def test_unscored_samples_are_out_of_the_group_statistics() -> None:
    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, nan, 1.0, 1.0, nan, 1.0, 1.0])
    adv = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(adv[:4], torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3]))  # mean of the 3 scored
    torch.testing.assert_close(adv[4:], torch.zeros(4))
    scaled = group_advantages(rewards, 4, "group")
    std = float(torch.tensor([1.0, 0.0, 1.0]).std())
    torch.testing.assert_close(scaled[:4], torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3]) / (std + 1e-4))
    assert zero_variance_groups(rewards, 4).tolist() == [False, True]
    assert not torch.isnan(group_advantages(rewards, 4, "batch")).any()


def test_old_log_probs_are_detached_and_skipped_rows_do_not_change_the_normaliser() -> None:
    theta = torch.tensor(0.3, requires_grad=True)
    logp = _two_token_logp(theta, [0, 1])
    terms = grpo_loss(logp, logp, torch.tensor([1.0, -1.0]), torch.ones(2, 1))  # old = current, not detached
    (grad,) = torch.autograd.grad(terms.loss, theta)
    assert float(grad) != 0.0  # the ratio's gradient survives: old_logp was treated as a constant
    # a zero-advantage row dropped from the computation but still counted: the same loss
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-1.5, -0.1]])
    old = logp - 0.05
    adv = torch.tensor([1.0, 0.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        whole = grpo_loss(logp, old, adv, mask, loss_type=loss_type, max_len=4).loss  # type: ignore[arg-type]
        kept = [0, 2]
        part = grpo_loss(
            logp[kept], old[kept], adv[kept], mask[kept], loss_type=loss_type, max_len=4,  # type: ignore[arg-type]
            num_sequences=3, num_tokens=5.0,
        ).loss  # fmt: skip
        assert float(part) == pytest.approx(float(whole), abs=1e-6)


# --- the latent policy on the tiny preset -------------------------------------------------------------

import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import load as load_safetensors  # noqa: E402

from llm_trm_core.config import load_config  # noqa: E402
from llm_trm_core.data.problems import read_problems  # noqa: E402
from llm_trm_core.errors import UserError  # noqa: E402
from llm_trm_core.grpo.learner import GRPOLearner  # noqa: E402
from llm_trm_core.grpo.rollout import answer_log_probs, sample_answers  # noqa: E402
from llm_trm_core.grpo.train import step_problems  # noqa: E402
from llm_trm_core.latent.artifacts import build_reasoner, load_grpo, load_latent, load_mean_inputs  # noqa: E402
from llm_trm_core.latent.reasoner import LatentReasoner  # noqa: E402
from llm_trm_core.stages import evaluate as evaluate_stage  # noqa: E402
from llm_trm_core.stages.evaluate import run_evaluate  # noqa: E402
from llm_trm_core.stages.grpo import HeldoutCheck, grpo_problem_config, run_grpo  # noqa: E402
from llm_trm_core.stages.latent import run_latent  # noqa: E402
from llm_trm_core.stages.problems import run_problems  # noqa: E402
from llm_trm_core.stages.trm import run_trm, run_upstream_pairs  # noqa: E402
from llm_trm_core.store import ArtifactStore  # noqa: E402
from llm_trm_core.training.schedules import lr_multiplier, make_scheduler  # noqa: E402


@pytest.fixture(scope="module")
def chain():
    cfg = load_config("tiny", [f"store.root=memory://grpo-{uuid.uuid4().hex[:8]}"])
    store = ArtifactStore(cfg.store.root)
    pairs = run_upstream_pairs(cfg, store)
    trm = run_trm(cfg, store, pairs)
    compressor = store.read_manifest("compressor", pairs.upstream["compressor"])
    problems = run_problems(cfg, store)
    latent = run_latent(cfg, store, problems, compressor, trm)
    return cfg, store, problems, compressor, trm, latent


def _policy(chain) -> tuple[LatentReasoner, LatentReasoner]:
    cfg, store, _, compressor, trm, latent = chain
    policy = load_latent(store, latent, build_reasoner(cfg, store, compressor, trm))
    reference = LatentReasoner(
        policy.lm, policy.compressor, copy.deepcopy(policy.trm).requires_grad_(False),
        copy.deepcopy(policy.projector).requires_grad_(False), policy.layer_index, policy.n_steps,
        policy.drop_system_prefix,
    )  # fmt: skip
    return policy, reference


def test_answer_log_probs_are_the_sampling_distribution(chain) -> None:
    """Teacher-forced log-probs equal log_softmax(logits / T) of a plain forward over [prompt, latents,
    answer], token by token, and the entropy taken while sampling equals the teacher-forced pass's (the
    step's entropy metric uses it)."""
    policy, _ = _policy(chain)
    batch = policy.encode_prompts(["What is 2 + 3?", "How many legs do 3 spiders have and why?"])
    latents = policy.latents(batch, "trm_latent").detach()
    rollout = sample_answers(policy, policy.prefix(batch.ids), latents, temperature=0.7, max_new_tokens=5, seed=3)
    again = sample_answers(policy, policy.prefix(batch.ids), latents, temperature=0.7, max_new_tokens=5, seed=3)
    assert rollout.completions == again.completions  # seeded
    embeds, mask, starts = policy.input_embeddings(batch.ids, latents, rollout.completions)
    with torch.no_grad():
        logits = policy.lm.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits  # fmt: skip
        scored = answer_log_probs(policy, policy.prefix(batch.ids), latents, rollout.completions, temperature=0.7)
    for row, completion in enumerate(rollout.completions):
        for t, token in enumerate(completion):
            expected = (logits[row, starts[row] - 1 + t].float() / 0.7).log_softmax(-1)[token]
            assert float(scored.logp[row, t]) == pytest.approx(float(expected), abs=1e-4)
        assert float(scored.mask[row].sum()) == len(completion)
        assert float(scored.entropy[row].sum()) > 0.0
        assert rollout.entropy[row] == pytest.approx(float(scored.entropy[row].sum()), rel=1e-4)


def test_model_generation_defaults_cannot_change_the_rollout_distribution(chain) -> None:
    """A model whose generation_config.json adds processors (repetition penalty, top-k/p, n-gram bans, a
    minimum length) samples exactly as a clean one: the rollout passes an explicit, neutral config."""
    policy, _ = _policy(chain)
    batch = policy.encode_prompts(["What is 2 + 3?", "How many legs do 3 spiders have and why?"])
    latents = policy.latents(batch, "trm_latent").detach()
    clean = sample_answers(policy, policy.prefix(batch.ids), latents, temperature=0.9, max_new_tokens=6, seed=5)
    defaults = policy.lm.model.generation_config
    saved = copy.deepcopy(defaults)
    try:
        for name, value in {"repetition_penalty": 3.0, "top_k": 2, "top_p": 0.3, "no_repeat_ngram_size": 1,
                            "min_new_tokens": 6, "temperature": 0.1}.items():  # fmt: skip
            setattr(defaults, name, value)
        polluted = sample_answers(policy, policy.prefix(batch.ids), latents, temperature=0.9, max_new_tokens=6, seed=5)
    finally:
        policy.lm.model.generation_config = saved
    assert polluted.completions == clean.completions


def test_gradient_reaches_the_trm_and_never_the_lm(chain) -> None:
    cfg, store, problems, *_ = chain
    policy, reference = _policy(chain)
    policy.trm.requires_grad_(True)
    params = [*policy.trm.parameters(), *policy.projector.parameters()]
    g = cfg.grpo.model_copy(update={"skip_zero_variance": False, "beta": 0.04})
    optimizer = torch.optim.SGD(params, lr=0.0)
    learner = GRPOLearner(
        policy, reference, g, params, optimizer, make_scheduler(optimizer, lr_multiplier("constant", 1, 0)),
        [(lambda completions, completion_ids, **_: [float(ids[0] % 2) for ids in completion_ids], 1.0)], seed=0,
    )  # fmt: skip
    seen: dict[str, bool] = {}

    def check_before_step(*_):
        # every TRM weight except the halting head (the latent policy runs all supervision steps)
        seen["trm"] = all((p.grad is not None) != n.startswith("halt_head") for n, p in policy.trm.named_parameters())
        seen["lm"] = all(p.grad is None for p in policy.lm.model.parameters())

    optimizer.register_step_pre_hook(check_before_step)
    questions = [p.question for p in read_problems(store, problems).split("train")[:2]]
    metrics = learner.step(0, questions, {"answer_value": [0.0, 0.0]})
    assert metrics["updated"] and seen == {"trm": True, "lm": True}
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy still equals the reference
    for key in ("reward_mean", "reward_std", "accuracy", "clip_fraction", "entropy", "completion_length"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), key


def _first_step_gradient(chain, questions, reward, **grpo) -> tuple[dict, torch.Tensor]:
    """One learner step (lr 0, 3-token answers) on a fresh policy: its metrics and the projector's gradient."""
    cfg = chain[0]
    policy, reference = _policy(chain)
    params = list(policy.projector.parameters())
    g = cfg.grpo.model_copy(update={**grpo, "max_completion_tokens": 3})
    optimizer = torch.optim.SGD(params, lr=0.0)
    learner = GRPOLearner(
        policy, reference, g, params, optimizer, make_scheduler(optimizer, lr_multiplier("constant", 1, 0)),
        [(reward, 1.0)], seed=0,
    )  # fmt: skip
    captured: dict[str, torch.Tensor] = {}
    optimizer.register_step_pre_hook(lambda *_: captured.update(w=params[0].grad.clone()))
    metrics = learner.step(0, questions, {})
    return metrics, captured["w"]


def test_skipping_zero_variance_groups_keeps_the_step_size(chain) -> None:
    """Two questions, the second one's group always rewarded 1 (no signal): the gradient is the same whether
    that group is computed (advantage 0) or skipped, because the normaliser counts every sequence (TRL)."""
    _, store, problems, *_ = chain
    questions = [p.question for p in read_problems(store, problems).split("train")[:2]]

    def reward(completions, completion_ids, prompts, **_):
        return [float(ids[0] % 2) if q == questions[0] else 1.0 for ids, q in zip(completion_ids, prompts, strict=True)]

    grads = {}
    for skip in (True, False):
        metrics, grad = _first_step_gradient(chain, questions, reward, skip_zero_variance=skip, beta=0.0)
        grads[skip] = (grad, metrics)
    (with_skip, m1), (without, m2) = grads[True], grads[False]
    assert m1["skipped_groups"] >= 1 and m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    torch.testing.assert_close(with_skip, without, atol=1e-6, rtol=1e-5)


def test_on_policy_step_without_the_no_grad_pass_equals_the_full_computation(chain) -> None:
    """beta = 0 and one update per rollout: the old log-probs are the gradient pass's own (detached) and no
    reference pass runs. At the first step the policy equals the reference, so beta > 0 (which runs the
    no-grad pass over every sample and the reference pass) must give the same gradient, loss and entropy."""
    _, store, problems, *_ = chain
    questions = [p.question for p in read_problems(store, problems).split("train")[:2]]

    def reward(completions, completion_ids, **_):
        return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]

    runs = {beta: _first_step_gradient(chain, questions, reward, skip_zero_variance=False, beta=beta)
            for beta in (0.0, 0.04)}  # fmt: skip
    (fast, fast_grad), (full, full_grad) = runs[0.0], runs[0.04]
    assert fast["kl"] is None and full["kl"] == pytest.approx(0.0, abs=1e-6)
    assert float(fast_grad.abs().sum()) > 0.0  # a real gradient, not two zeros
    torch.testing.assert_close(fast_grad, full_grad, atol=1e-6, rtol=1e-5)
    assert fast["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert fast["entropy"] == pytest.approx(full["entropy"], rel=1e-5)


def test_grpo_raises_the_reward_on_a_learnable_toy_task(chain) -> None:
    """Toy task: reward 1 when the first answer token's id is a multiple of 3 (base rate ~1/3). The tiny
    random LM's logits are near-uniform, so its LM head is sharpened (x8) to make the first token
    steerable by the latents; the LM stays frozen and only the TRM + projection learn. Seeded."""
    cfg, store, problems, *_ = chain
    policy, reference = _policy(chain)
    with torch.no_grad():
        policy.lm.model.get_output_embeddings().weight.mul_(8.0)
    policy.trm.requires_grad_(True)
    params = [*policy.trm.parameters(), *policy.projector.parameters()]
    g = cfg.grpo.model_copy(update={"max_completion_tokens": 2, "lr": 0.01, "group_size": 8, "micro_batch": 16})
    optimizer = torch.optim.AdamW(params, lr=g.lr)

    def first_token_multiple_of_3(completions, completion_ids, **_):
        return [float(ids[0] % 3 == 0) for ids in completion_ids]

    learner = GRPOLearner(
        policy, reference, g, params, optimizer, make_scheduler(optimizer, lr_multiplier("constant", 20, 0)),
        [(first_token_multiple_of_3, 1.0)], seed=0,
    )  # fmt: skip
    train = read_problems(store, problems).split("train")
    rewards = []
    for step in range(20):
        chosen = step_problems(train, step, 4, 0)
        rewards.append(learner.step(step, [p.question for p in chosen], {"answer_value": [0.0] * 4})["reward_mean"])
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards


def test_grpo_stage_caches_and_reports_before_after(chain) -> None:
    cfg, store, problems, compressor, trm, latent = chain
    grpo_problems = run_problems(grpo_problem_config(cfg), store)
    assert grpo_problems.metrics["source"] == "arithmetic"
    manifest = run_grpo(cfg, store, grpo_problems, compressor, trm, latent)
    assert manifest.upstream == {
        "problems": grpo_problems.key, "compressor": compressor.key, "trm": trm.key, "latent": latent.key,
    }  # fmt: skip
    history = manifest.metrics["history"]
    assert [h["step"] for h in history] == list(range(1, cfg.grpo.steps + 1))
    for key in ("reward_mean", "reward_std", "accuracy", "kl", "clip_fraction", "entropy", "completion_length",
                "skipped_groups"):  # fmt: skip
        assert all(key in h for h in history), key
    heldout_arms = ["no_latent", "trm_latent", "mean_latent", "shuffled_latent"]
    assert [r["arm"] for r in manifest.metrics["heldout"]] == heldout_arms
    versus = manifest.metrics["heldout_comparisons_after"]  # paired verdicts of trm_latent after GRPO
    assert [c["other"] for c in versus] == ["no_latent", "mean_latent", "shuffled_latent"]
    assert all(c["verdict"] in ("better", "worse", "indistinguishable") for c in versus)
    artifact = store.open("grpo", manifest.key)
    assert {"trm.safetensors", "projector.safetensors", "history.json", "rewards.png", "report.md"} <= set(
        artifact.manifest.files
    )
    assert "Held-out check" in artifact.read_bytes("report.md").decode()
    assert run_grpo(cfg, store, grpo_problems, compressor, trm, latent) == manifest  # cached by store key

    before = run_evaluate(cfg, store, problems, compressor, trm, latent)
    after = run_evaluate(cfg, store, problems, compressor, trm, latent, grpo=manifest, before=before)
    assert after.key != before.key and after.upstream["grpo"] == manifest.key
    assert [r["arm"] for r in after.metrics["before_after"]] == [r["arm"] for r in before.metrics["rows"]]
    assert after.metrics["reused_arms"] == ["no_think", "think"]
    rows = {r["arm"]: r for r in after.metrics["before_after"]}
    assert rows["no_think"]["change"] == 0.0  # the LM-only arm is the same answers
    assert rows["trm_latent"]["before"] == before.metrics["arms"]["trm_latent"]["accuracy"]
    assert "Before vs after GRPO" in store.open("evaluate", after.key).read_bytes("report.md").decode()
    with pytest.raises(UserError, match="not a pre-GRPO evaluation"):
        run_evaluate(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"seed": 5})}), store,
                     problems, compressor, trm, latent, grpo=manifest, before=after)  # fmt: skip


def test_evaluation_after_grpo_refits_the_mean_output_on_kept_trm_inputs_without_the_lm(chain, monkeypatch) -> None:
    """The latent artifact keeps its training questions' TRM inputs; the evaluation after GRPO runs GRPO's TRM
    on them: the mean output a fresh encoding of those questions gives, and no prompt goes through the LM."""
    cfg, store, problems, compressor, trm, latent = chain
    grpo = run_grpo(cfg, store, run_problems(grpo_problem_config(cfg), store), compressor, trm, latent)
    assert "mean_inputs.safetensors" in store.open("latent", latent.key).manifest.files
    train = [p.question for p in read_problems(store, problems).select_split("train", cfg.latent.num_problems)]
    fresh = load_grpo(store, grpo, load_latent(store, latent, build_reasoner(cfg, store, compressor, trm)))
    fresh.trm.eval()
    expected = fresh.fit_mean_output(train, cfg.evaluate.batch_size)
    # the kept inputs give any TRM's mean output: one moved away from the latent stage's
    moved = load_latent(store, latent, build_reasoner(cfg, store, compressor, trm))
    stale = moved.mean_output
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moved.trm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved.trm.eval()
    kept = load_mean_inputs(store, latent)
    assert kept is not None and len(kept.pieces) == len(train)
    refit = moved.outputs_from(kept, cfg.evaluate.batch_size).mean(0)
    assert stale is not None and not torch.allclose(refit, stale, atol=1e-3)
    torch.testing.assert_close(refit, moved.fit_mean_output(train, cfg.evaluate.batch_size), atol=1e-5, rtol=1e-4)
    encoded: list[int] = []
    encode = LatentReasoner.encode_prompts
    monkeypatch.setattr(LatentReasoner, "encode_prompts", lambda self, q: encoded.append(len(q)) or encode(self, q))
    prepared = evaluate_stage._prepare(cfg, store, "k", problems, compressor, trm, latent, None, grpo, None)
    assert encoded == []
    assert prepared.reasoner.mean_output is not None
    torch.testing.assert_close(prepared.reasoner.mean_output, expected, atol=1e-5, rtol=1e-4)


def test_grpo_rejects_inconsistent_inputs(chain) -> None:
    cfg, store, problems, compressor, trm, latent = chain
    other_trm = run_trm(load_config("tiny", [f"store.root={cfg.store.root}", "trm.lr=0.002"]), store,
                        store.read_manifest("pairs", trm.upstream["pairs"]))  # fmt: skip
    with pytest.raises(UserError, match="was trained for TRM"):
        run_grpo(cfg, store, problems, compressor, other_trm, latent)
    lora_cfg = load_config("tiny", [f"store.root={cfg.store.root}", "latent.lora_rank=2", "grpo.lora_rank=2"])
    lora_latent = run_latent(lora_cfg, store, problems, compressor, trm)
    with pytest.raises(UserError, match="latent stage without LoRA"):
        run_grpo(lora_cfg, store, problems, compressor, trm, lora_latent)
    with pytest.raises(UserError, match="trains nothing"):
        load_config("tiny", ["grpo.train_trm=false", "grpo.train_projector=false"])


def test_grpo_resumes_exactly_after_sigkill(tmp_path: Path) -> None:
    overrides = ("grpo.steps=6", "grpo.temperature=1.0")
    whole = tmp_path / "whole"
    done = run_stage("grpo", f"file://{whole}", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = json.loads(done.stdout.strip().splitlines()[-1])
    # the same upstream artifacts, without the GRPO artifact: only GRPO reruns
    shutil.copytree(whole, tmp_path / "killed", ignore=lambda d, names: ["grpo"] if d == str(whole) else [])
    killed = run_stage("grpo", f"file://{tmp_path / 'killed'}", *overrides, fault="checkpoint:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not list((tmp_path / "killed" / "grpo").glob("*/_MANIFEST.json"))
    resumed = run_stage("grpo", f"file://{tmp_path / 'killed'}", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["key"] == uninterrupted["key"] and result["metrics"]["resumed_from"] == 4
    a, b = ArtifactStore(f"file://{whole}"), ArtifactStore(f"file://{tmp_path / 'killed'}")
    for name in ("trm.safetensors", "projector.safetensors"):
        x = load_safetensors(a.open("grpo", result["key"]).read_bytes(name))
        y = load_safetensors(b.open("grpo", result["key"]).read_bytes(name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    history_a = json.loads(a.open("grpo", result["key"]).read_bytes("history.json"))
    history_b = json.loads(b.open("grpo", result["key"]).read_bytes("history.json"))
    assert history_a == history_b


def test_heldout_check_after_training_reuses_prompts_and_the_unchanged_lm_arm(chain, monkeypatch) -> None:
    """The second check (after the TRM and projection moved) reuses the first one's prompt encodings and,
    the LM being frozen without adapters, its no-latent answers: it gives what a fresh check gives, with
    the same refitted mean output, and decodes no no-latent arm."""
    _, store, problems, *_ = chain
    policy, _ = _policy(chain)
    split = read_problems(store, problems)
    train, test = split.split("train"), split.select_split("test", 6)
    check = HeldoutCheck(policy, train, test, max_new_tokens=4, batch_size=4, seed=0)
    before = check.run()
    with torch.no_grad():
        for p in policy.projector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    decoded: list[list[str]] = []
    original = LatentReasoner.generate_arms

    def spy(self, batch, latents, *args, **kwargs):
        decoded.append(list(latents))
        return original(self, batch, latents, *args, **kwargs)

    monkeypatch.setattr(LatentReasoner, "generate_arms", spy)
    after = check.run(lm_unchanged=True)
    reused_mean = policy.mean_output.clone()
    assert decoded and all("no_latent" not in arms for arms in decoded)
    decoded.clear()
    fresh = HeldoutCheck(policy, train, test, max_new_tokens=4, batch_size=4, seed=0).run()
    assert any("no_latent" in arms for arms in decoded)
    assert after == fresh and after["no_latent"] == before["no_latent"]
    assert torch.equal(reused_mean, policy.mean_output)
    assert len(after["trm_latent"]) == len(test) == 6
