"""Latent reasoning at inference and end-task evaluation on the tiny preset."""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch

import llm_trm_core.latent.train as latent_train
import llm_trm_core.stages.evaluate as evaluate_stage
from llm_trm_core.config import load_config
from llm_trm_core.data.problems import read_problems
from llm_trm_core.errors import UserError
from llm_trm_core.latent.artifacts import build_reasoner, load_latent
from llm_trm_core.latent.reasoner import LatentProjector, LatentReasoner
from llm_trm_core.lm import load_language_model
from llm_trm_core.stages.evaluate import ARMS, bootstrap_ci, held_out_problems, run_evaluate, summarize_arm
from llm_trm_core.stages.latent import run_latent
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.stages.trm import run_trm, run_upstream_pairs
from llm_trm_core.store import ArtifactStore
from llm_trm_core.training.checkpoints import CheckpointManager
from tests.helpers.stage_cli import run_stage


@pytest.fixture(scope="module")
def chain():
    cfg = load_config("tiny", [f"store.root=memory://lat-{uuid.uuid4().hex[:8]}"])
    store = ArtifactStore(cfg.store.root)
    pairs = run_upstream_pairs(cfg, store)
    trm = run_trm(cfg, store, pairs)
    compressor = store.read_manifest("compressor", pairs.upstream["compressor"])
    return cfg, store, run_problems(cfg, store), compressor, trm


def test_projector_and_injection_layout(chain) -> None:
    cfg, store, _, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    projector = LatentProjector(16, 64, 3, embed_rms=0.5)
    out = projector(torch.randn(2, 16))
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.full((2, 3), 0.5), atol=1e-3, rtol=1e-3)

    batch = reasoner.encode_prompts(["What is 2 + 3?", "A much longer question about apples and oranges?"])
    assert batch.pre.shape[0] == 2 and batch.pre.shape[2] == 16 and batch.mask.sum(1).min() > 0
    latents = reasoner.latents(batch, "trm_latent")
    assert latents.shape == (2, cfg.latent.num_latents, 64)
    embeds, mask, starts = reasoner.input_embeddings(batch.ids, latents, answers=[[5, 6], [7]])
    k = cfg.latent.num_latents
    for row in range(2):
        length = len(batch.ids[row]) + k + (2 if row == 0 else 1)
        assert int(mask[row].sum()) == length and bool(mask[row, -1])  # left padding
        start = starts[row]
        torch.testing.assert_close(embeds[row, start - k : start], latents[row])  # latents right before the answer
    # random latents: same norms, other directions
    random = reasoner.latents(batch, "random_latent", torch.Generator().manual_seed(0))
    torch.testing.assert_close(random.norm(dim=-1), latents.norm(dim=-1))
    assert not torch.allclose(random, latents)


def test_injected_generation_with_kv_cache_equals_full_recomputation(chain) -> None:
    cfg, store, _, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    questions = ["What is 2 + 3?", "How many legs do 3 spiders have?"]
    cached = reasoner.generate(questions, "trm_latent", max_new_tokens=8)
    batch = reasoner.encode_prompts(questions)
    latents = reasoner.latents(batch, "trm_latent")
    embed = reasoner.lm.model.get_input_embeddings()
    eos = reasoner.lm.tokenizer.eos_token_id
    for row in range(2):  # one sample alone, no cache: recompute the whole sequence at every step
        sequence = torch.cat([embed(torch.tensor(batch.ids[row])), latents[row]])
        tokens: list[int] = []
        with torch.no_grad():
            for _ in range(8):
                logits = reasoner.lm.model(inputs_embeds=sequence[None], use_cache=False).logits[0, -1]
                token = int(logits.argmax())
                if token == eos:
                    break
                tokens.append(token)
                sequence = torch.cat([sequence, embed(torch.tensor([token]))])
        assert cached[row] == tokens


def test_arms_decoded_together_from_one_prefill_equal_each_arm_decoded_alone(chain) -> None:
    cfg, store, _, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    questions = ["What is 2 + 3?", "How many legs do 3 spiders and 2 cats have together?", "What is 10 - 4?"]
    batch = reasoner.encode_prompts(questions)
    with torch.no_grad():
        real = reasoner.latents(batch, "trm_latent")
        random = reasoner.latents(batch, "random_latent", torch.Generator().manual_seed(1))
    arms = {"no_think": None, "trm_latent": real, "random_latent": random}
    together, seconds = reasoner.generate_arms(batch, arms, max_new_tokens=6, lm_only=("no_think",))
    assert set(together) == set(arms) and all(s >= 0 for s in seconds.values())
    model, tok = reasoner.lm.model, reasoner.lm.tokenizer
    embed = model.get_input_embeddings()
    for arm, latents in arms.items():
        for row, ids in enumerate(batch.ids):  # alone: no padding, no shared cache, the whole sequence at once
            parts = [embed(torch.tensor(ids))] + ([latents[row]] if latents is not None else [])
            sequence = torch.cat(parts)[None]
            with torch.no_grad():
                alone = model.generate(
                    inputs_embeds=sequence, attention_mask=torch.ones(1, sequence.shape[1], dtype=torch.long),
                    max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )[0].tolist()  # fmt: skip
            expected = alone[: alone.index(tok.eos_token_id)] if tok.eos_token_id in alone else alone
            assert together[arm][row] == expected, (arm, row)


def test_original_style_arm_sets_the_first_token_from_the_decompressed_trm_output(chain) -> None:
    cfg, store, _, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    answers = reasoner.generate_original_style(reasoner.encode_prompts(["What is 2 + 3?"]), max_new_tokens=4)
    post = reasoner.compressor.decompress(reasoner.trm_output(reasoner.encode_prompts(["What is 2 + 3?"])))
    first = int(reasoner.lm.model.get_output_embeddings()(post).argmax(-1))
    assert answers[0][:1] == ([first] if first != reasoner.lm.tokenizer.eos_token_id else [])


@pytest.mark.parametrize("prompt_cache", ["kept", "dropped", "prompt goes on"])
def test_original_style_arm_reads_the_state_at_think_end(chain, prompt_cache: str) -> None:
    """Decoded from the batch's own prompt cache (the no-think prompt ends one token after `</think>`), from
    a new prefill when the batch kept none, or from the prompt cut after `</think>` when it goes on longer:
    each answer is what `generate` gives for that question alone."""
    cfg, store, _, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    questions = ["What is 2 + 3?", "How many legs do 3 spiders and 2 cats have together?"]
    batch = reasoner.encode_prompts(questions)
    assert batch.prefix is not None
    assert all(end == len(ids) - 2 for ids, end in zip(batch.ids, batch.think_end, strict=True))
    if prompt_cache != "kept":
        batch.prefix = None
    if prompt_cache == "prompt goes on":
        batch.ids = [[*ids, ids[-1]] for ids in batch.ids]
    end_ids = reasoner.lm.chat.delimiters.end_ids
    answers = reasoner.generate_original_style(batch, max_new_tokens=5)  # both decoded together, left-padded
    eos = reasoner.lm.tokenizer.eos_token_id
    for row, end in enumerate(batch.think_end):
        assert tuple(batch.ids[row][end - len(end_ids) + 1 : end + 1]) == end_ids  # </think>'s last token
        assert end < len(batch.ids[row]) - 1  # the no-think prompt goes on after it ("\n"): not the position used
        if not answers[row]:
            continue  # the TRM's token was EOS
        prefix = [*batch.ids[row][: end + 1], answers[row][0]]  # the predicted token follows </think> directly
        expected = reasoner.lm.model.generate(
            input_ids=torch.tensor([prefix]), max_new_tokens=4, do_sample=False,
            pad_token_id=reasoner.lm.tokenizer.pad_token_id, eos_token_id=eos,
        )[0, len(prefix) :].tolist()  # fmt: skip
        assert answers[row][1:] == (expected[: expected.index(eos)] if eos in expected else expected)


def test_capacity_matched_controls(chain) -> None:
    cfg, store, _, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    questions = ["What is 2 + 3?", "How many legs do 3 spiders have?", "What is 10 - 4?"]
    batch = reasoner.encode_prompts(questions)
    with pytest.raises(UserError, match="training-mean output"):
        reasoner.latents(batch, "mean_latent")
    mean = reasoner.fit_mean_output(["What is 1 + 1?", "What is 7 * 3?"], batch_size=1)
    two = ["What is 1 + 1?", "What is 7 * 3?"]
    torch.testing.assert_close(mean, reasoner.outputs_from(reasoner.trm_inputs(two, 2), 2).mean(0))  # batch-free
    same = reasoner.latents(batch, "mean_latent")
    assert same.shape == (3, cfg.latent.num_latents, 64)
    torch.testing.assert_close(same[0], same[2])  # one vector for every question
    outputs = reasoner.outputs_from(reasoner.trm_inputs(questions, 2), 2)
    from llm_trm_core.stats import derangement

    perm = derangement(3, 0)
    shuffled = reasoner.latents(batch, "shuffled_latent", outputs=outputs[perm])
    real = reasoner.latents(batch, "trm_latent")
    for row in range(3):  # question row gets the latents of question perm[row]
        torch.testing.assert_close(shuffled[row], real[perm[row]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one permuted TRM output per question"):
        reasoner.latents(batch, "shuffled_latent")


def test_think_arm_graded_after_the_end_delimiter() -> None:
    from llm_trm_core.stages.evaluate import think_answer

    assert think_answer([5, 6, 99, 7, 8], [99]) == ([7, 8], True)
    assert think_answer([5, 99, 6, 99, 7], [99]) == ([7], True)  # the last </think>
    assert think_answer([5, 6, 7], [99]) == ([], False)  # cut by the budget: no answer, graded wrong
    assert think_answer([1, 98, 99, 4], [98, 99]) == ([4], True)


def test_evaluate_arm_config_errors() -> None:
    from llm_trm_core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown evaluate.arms"):
        load_config("tiny", ["evaluate.arms=[no_think,trm_latent,bogus]"])
    with pytest.raises(ConfigError, match="evaluate.reference 'think' is not among"):
        load_config("tiny", ["evaluate.arms=[no_think,trm_latent]", "evaluate.reference=think"])
    assert load_config("tiny", ["evaluate.arms=[no_think,think]", "evaluate.reference=think"]).evaluate.arms


def test_bootstrap_and_summary_maths() -> None:
    assert bootstrap_ci([True] * 20, 500) == (1.0, 1.0)
    assert bootstrap_ci([False] * 20, 500) == (0.0, 0.0)
    values = [i % 2 == 0 for i in range(400)]
    low, high = bootstrap_ci(values, 4000, seed=1)
    half_width = 1.96 * (0.25 / 400) ** 0.5  # normal approximation: ±0.049
    assert low == pytest.approx(0.5 - half_width, abs=0.01) and high == pytest.approx(0.5 + half_width, abs=0.01)
    assert bootstrap_ci(values, 1000, seed=3) == bootstrap_ci(values, 1000, seed=3)
    graded = [{"correct": c, "strict": False, "tokens": 4, "seconds": 0.5} for c in (True, False, False, True)]
    row = summarize_arm("x", graded, 500, 0)
    assert row["accuracy"] == 0.5 and row["tokens_per_answer"] == 4 and row["n"] == 4
    assert row["ci_low"] <= 0.5 <= row["ci_high"]


def test_latent_training_resumes_exactly_and_evaluation_reports_every_arm(chain, monkeypatch) -> None:
    cfg, store, problems, compressor, trm = chain
    straight_store = ArtifactStore(f"memory://lat-{uuid.uuid4().hex[:8]}")
    for stage, manifest in (("problems", problems), ("compressor", compressor), ("trm", trm)):
        store.fs.cp(store.path(stage, manifest.key), straight_store.path(stage, manifest.key), recursive=True)
    pairs_key = trm.upstream["pairs"]
    store.fs.cp(store.path("pairs", pairs_key), straight_store.path("pairs", pairs_key), recursive=True)
    reference = run_latent(cfg, straight_store, problems, compressor, trm)

    original_save = CheckpointManager.save

    def save_then_die(self, step, state):
        original_save(self, step, state)
        if step == 4:
            raise RuntimeError("preempted")

    monkeypatch.setattr(CheckpointManager, "save", save_then_die)
    with pytest.raises(RuntimeError, match="preempted"):
        run_latent(cfg, store, problems, compressor, trm)
    monkeypatch.setattr(CheckpointManager, "save", original_save)
    resumed = run_latent(cfg, store, problems, compressor, trm)
    assert resumed.metrics["resumed_from"] == 4 and resumed.key == reference.key
    a = load_latent(store, resumed, build_reasoner(cfg, store, compressor, trm)).projector.state_dict()
    b = load_latent(
        straight_store, reference, build_reasoner(cfg, straight_store, compressor, trm)
    ).projector.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(resumed.metrics["val_answer_nll"]) == {
        "trm_latent", "random_latent", "mean_latent", "shuffled_latent", "no_latent"
    }  # fmt: skip

    report = run_evaluate(cfg, store, problems, compressor, trm, resumed)
    assert [row["arm"] for row in report.metrics["rows"]] == list(ARMS)
    for row in report.metrics["rows"]:
        assert row["n"] == cfg.evaluate.num_problems and 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
    think = report.metrics["arms"]["think"]["tokens_per_answer"]
    assert think > report.metrics["arms"]["no_think"]["tokens_per_answer"]  # the thinking arm spends more tokens
    # every other arm compared with the reference by a paired interval, the verdict read from it
    compared = {c["other"]: c for c in report.metrics["comparisons"]}
    assert set(compared) == set(ARMS) - {"trm_latent"}
    for c in compared.values():
        assert c["reference"] == "trm_latent" and c["ci_low"] <= c["difference"] <= c["ci_high"]
        expected = "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "indistinguishable"
        assert c["verdict"] == expected and c["min_detectable"] > 0
    text = store.open("evaluate", report.key).read_bytes("report.md").decode()
    assert "Paired comparisons with trm_latent" in text and "Power:" in text and "graded on the text after" in text
    assert report.metrics["arms"]["think"]["unfinished"] >= 0


def test_latent_training_from_prompts_encoded_once_matches_encoding_every_batch(chain, monkeypatch) -> None:
    cfg, store, problems, compressor, trm = chain
    train = read_problems(store, problems).select_split("train", cfg.latent.num_problems)
    lat = cfg.latent.model_copy(update={"epochs": 2, "batch_size": 3})
    runs = {}
    for kept in (True, False):
        torch.manual_seed(0)
        reasoner = build_reasoner(cfg, store, compressor, trm)
        prompts = latent_train.encode_training_prompts(reasoner, train, lat) if kept else None
        encoded = []
        monkeypatch.setattr(LatentReasoner, "encode_prompts", _counting(LatentReasoner.encode_prompts, encoded))
        result = latent_train.train_latent(reasoner, train, lat, seed=0, prompts=prompts)
        monkeypatch.undo()
        runs[kept] = ([h["loss"] for h in result.history], reasoner.projector.state_dict(), len(encoded), prompts)
    (kept_losses, kept_weights, kept_encodes, prompts), (losses, weights, encodes, _) = runs[True], runs[False]
    assert kept_encodes == 0 and encodes == 2 * math.ceil(len(train) / 3)  # no prompt encoded during training
    assert kept_losses == pytest.approx(losses, rel=1e-4)
    assert all(torch.allclose(kept_weights[k], weights[k], atol=1e-5) for k in weights)
    # the mean output from the kept encodings is the one a fresh pass over the training questions fits
    assert prompts is not None
    fitted = build_reasoner(cfg, store, compressor, trm).fit_mean_output([p.question for p in train], 3)
    assert torch.equal(prompts.mean_output(), fitted)
    # what trains the LM or the TRM, or too little memory, encodes per batch
    reasoner = build_reasoner(cfg, store, compressor, trm)
    assert latent_train.encode_training_prompts(reasoner, train, lat.model_copy(update={"train_trm": True})) is None
    monkeypatch.setattr(latent_train, "KEPT_PREFIX_BYTES", 1000)
    assert latent_train.encode_training_prompts(reasoner, train, lat) is None


def _counting(method, calls: list):
    def counted(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    return counted


def test_evaluation_reuses_the_latent_mean_and_the_first_pass_prompt_caches(chain, monkeypatch) -> None:
    cfg, store, problems, compressor, trm = chain
    latent = run_latent(cfg, store, problems, compressor, trm)
    artifact = store.open("latent", latent.key)
    assert "mean_output.safetensors" in artifact.manifest.files
    reasoner = load_latent(store, latent, build_reasoner(cfg, store, compressor, trm))
    stored = reasoner.mean_output
    train = read_problems(store, problems).select_split("train", cfg.latent.num_problems)
    refit = reasoner.fit_mean_output([p.question for p in train], batch_size=3)  # another batching: rounding only
    assert stored is not None and torch.allclose(stored, refit, atol=1e-5)

    def no_refit(*args, **kwargs):
        raise AssertionError("the latent artifact's mean output should have been used")

    test = held_out_problems(cfg, store, problems)
    arms = ["no_think", "trm_latent", "mean_latent", "shuffled_latent"]
    prefills = []
    original_prefix = LatentReasoner.prefix

    def counted(self, ids, grad=False):
        prefills.append(len(ids))
        return original_prefix(self, ids, grad)

    answers = {}
    for budget in (evaluate_stage.KEPT_PREFIX_BYTES, 0):
        reasoner = load_latent(store, latent, build_reasoner(cfg, store, compressor, trm))
        monkeypatch.setattr(LatentReasoner, "fit_mean_output", no_refit)
        monkeypatch.setattr(LatentReasoner, "prefix", counted)
        monkeypatch.setattr(evaluate_stage, "KEPT_PREFIX_BYTES", budget)
        prefills.clear()
        result = evaluate_stage.answer_arms(reasoner, cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
            update={"batch_size": 2})}), test, arms, 8, [])  # fmt: skip
        answers[budget] = ({a: [(r["id"], r["text"]) for r in rows] for a, rows in result.items()}, len(prefills))
        monkeypatch.undo()
    (kept, kept_prefills), (again, again_prefills) = answers.values()
    assert kept == again  # the kept caches are the prefill decoding would have made
    assert kept_prefills == 0 and again_prefills == len(evaluate_stage.evaluation_chunks(test, 2))


def test_trm_report_names_the_token_its_targets_predict(chain) -> None:
    cfg, store, _, _, trm = chain
    report = store.open("trm", trm.key).read_bytes("report.md").decode()
    named = re.search(r"LM-head fidelity: the LM head of the test targets puts token (.+) \(id (\d+)\) first", report)
    assert named is not None, report
    tokenizer = load_language_model(cfg.model, cfg.runtime).tokenizer
    assert named.group(1) == repr(tokenizer.decode([int(named.group(2))]))


def test_bad_inputs(chain) -> None:
    cfg, store, problems, compressor, trm = chain
    reasoner = build_reasoner(cfg, store, compressor, trm)
    with pytest.raises(UserError, match="exceeds the model's context"):
        reasoner.generate(["word " * 3000], "trm_latent", max_new_tokens=8)
    other = compressor.model_copy(update={"key": "another-compressor"})
    with pytest.raises(UserError, match="was not trained on pairs compressed by"):
        run_latent(cfg, store, problems, other, trm)
    small = load_config("tiny", ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"])
    with pytest.raises(UserError, match="belong to another language model"):
        build_reasoner(small, store, compressor, trm)
    assert latent_train.answer_text(18.0) == "#### 18" and latent_train.answer_text(2.5) == "#### 2.5"


def test_optional_lora_trains_adapters_and_is_restored_on_load(chain) -> None:
    cfg, store, problems, compressor, trm = chain
    lora_cfg = cfg.model_copy(update={"latent": cfg.latent.model_copy(update={"lora_rank": 4, "epochs": 1})})
    manifest = run_latent(lora_cfg, store, problems, compressor, trm)
    assert "LoRA r=4" in manifest.metrics["trained"]
    artifact = store.open("latent", manifest.key)
    assert {"lora.safetensors", "lora.json", "projector.safetensors"} <= set(artifact.manifest.files)
    from safetensors.torch import load as load_safetensors

    adapter = load_safetensors(artifact.read_bytes("lora.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero: it was trained

    plain = build_reasoner(cfg, store, compressor, trm)
    tuned = load_latent(store, manifest, build_reasoner(cfg, store, compressor, trm))
    question = ["What is 2 + 3?"]
    # the TRM's inputs are the LM's states without adapters, so they do not move
    torch.testing.assert_close(tuned.encode_prompts(question).pre, plain.encode_prompts(question).pre)
    batch = tuned.encode_prompts(question)
    embeds, mask, _ = tuned.input_embeddings(batch.ids, tuned.latents(batch, "trm_latent"))
    with torch.no_grad():
        with_lora = tuned.lm.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
        tuned.lm.model.disable_adapters()
        without = tuned.lm.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
        tuned.lm.model.enable_adapters()
    assert not torch.allclose(with_lora, without)  # the adapters change how the answer is read

    # the original-style arm is the original's method, with a frozen LM: adapters off, as in the LM-only arms
    with torch.no_grad():
        for name, weight in tuned.lm.model.named_parameters():
            if "lora_B" in name:
                weight.mul_(1e3)  # adapters that decide every token, so using them would show
    questions = ["What is 2 + 3?", "How many legs do 3 spiders and 2 cats have together?"]
    outputs = plain.trm_output(plain.encode_prompts(questions))
    expected = plain.generate_original_style(plain.encode_prompts(questions), 6, outputs)
    batch = tuned.encode_prompts(questions)
    with torch.no_grad():
        adapters_on = tuned._original_style_answers(batch, 6, outputs)
    assert adapters_on != expected  # the check below can fail
    assert tuned.generate_original_style(batch, 6, outputs) == expected


def test_evaluation_killed_mid_way_decodes_only_the_chunks_it_had_not_committed(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    done = run_stage("evaluate", f"file://{whole}", "evaluate.batch_size=2")
    assert done.returncode == 0, done.stderr[-3000:]
    key = json.loads(done.stdout.strip().splitlines()[-1])["key"]
    # the same upstream artifacts without the evaluation: killed after its second of four chunks
    shutil.copytree(whole, tmp_path / "killed", ignore=lambda d, names: ["evaluate"] if d == str(whole) else [])
    killed = run_stage("evaluate", f"file://{tmp_path / 'killed'}", "evaluate.batch_size=2", fault="checkpoint:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not list((tmp_path / "killed" / "evaluate").glob("*/_MANIFEST.json"))
    resumed = run_stage("evaluate", f"file://{tmp_path / 'killed'}", "evaluate.batch_size=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after 2/4 committed chunks" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["key"] == key
    a, b = (json.loads(ArtifactStore(f"file://{root}").open("evaluate", key).read_bytes("answers.json"))
            for root in (whole, tmp_path / "killed"))  # fmt: skip
    untimed = [{arm: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for arm, rows in x.items()}
               for x in (a, b)]  # fmt: skip
    assert untimed[0] == untimed[1] and set(a) == set(ARMS)
    assert not list((tmp_path / "killed" / "evaluate").glob(f"{key}/checkpoints*"))  # cleared after the commit
