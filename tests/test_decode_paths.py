"""CPU decode paths: the reserved-room KV cache (llm_trm_core/lm/prefix.py) decodes exactly what transformers'
own cache does, and the wide-head matmul (llm_trm_core/lm/loader.py) computes the same logits and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from llm_trm_core.config import load_config
from llm_trm_core.lm import decode as decode_module
from llm_trm_core.lm import load_language_model
from llm_trm_core.lm import prefix as prefix_module
from llm_trm_core.lm.loader import WideHeadLinear
from llm_trm_core.lm.prefix import (
    PromptPrefix,
    ReservedLayer,
    forward_suffix,
    generate_after,
    prefill,
    prefill_states,
    reserved_cache,
)
from llm_trm_core.lm.tokens import left_pad


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    return load_language_model(cfg.model, cfg.runtime)


PROMPTS = [[5, 9, 17, 33, 40], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18]]


def _generate(lm, cache: DynamicCache | None, new: int, **sampling) -> torch.Tensor:
    ids, mask = left_pad(PROMPTS, int(lm.tokenizer.pad_token_id or 0))
    extra = {} if cache is None else {"past_key_values": cache}
    torch.manual_seed(3)
    out: torch.Tensor = lm.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        pad_token_id=lm.tokenizer.pad_token_id, **sampling, **extra,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("room", [64, 3])  # room for everything; too little, so the layers must grow
def test_generate_with_reserved_room_equals_the_default_cache(tiny, room: int) -> None:
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}):
        expected = _generate(tiny, None, 12, **sampling)
        cache = reserved_cache(room)
        got = _generate(tiny, cache, 12, **sampling)
        assert torch.equal(got, expected), sampling
        layer = cache.layers[0]
        assert isinstance(layer, ReservedLayer) and layer.keys is not None
        assert layer.keys.shape[-2] == expected.shape[1] - 1  # every position but the last token's is cached


def test_a_prefix_continued_twice_is_not_changed_by_the_first_continuation(tiny) -> None:
    """Each continuation gets its own room: decoding from a prefix must not write into the prefix's tensors."""
    model, tok = tiny.model, tiny.tokenizer
    prefix = prefill(model, PROMPTS, int(tok.pad_token_id or 0))
    before = [k.clone() for k in prefix.keys]
    first = generate_after(model, prefix, None, 6, int(tok.eos_token_id), int(tok.pad_token_id or 0))
    second = generate_after(model, prefix, None, 6, int(tok.eos_token_id), int(tok.pad_token_id or 0))
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(before, prefix.keys, strict=True))


def test_batch_selection_keeps_the_room_and_writes_continue_after_it(tiny) -> None:
    layer = ReservedLayer(8)
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    layer.update(keys, keys + 100)
    layer.batch_select_indices(torch.tensor([1]))  # what decode does when rows finish
    assert layer.keys is not None
    room = layer.keys.data_ptr()
    step = torch.full((1, 1, 1, 2), -1.0)
    k, v = layer.update(step, step)
    assert k.data_ptr() == room  # written into the kept room, not a new buffer
    assert torch.equal(k, torch.cat([keys[1:], step], dim=2))
    assert torch.equal(v, torch.cat([keys[1:] + 100, step], dim=2))


def test_the_wide_head_computes_the_linear_head_and_its_gradients(tiny) -> None:
    head = tiny.model.get_output_embeddings()
    assert isinstance(head, WideHeadLinear)  # switched on CPU at load
    assert head.weight is tiny.model.get_input_embeddings().weight or not tiny.model.config.tie_word_embeddings
    weight = head.weight.detach().clone().requires_grad_(True)
    wide = WideHeadLinear(weight.shape[1], weight.shape[0], bias=False)
    wide.weight = torch.nn.Parameter(weight.detach().clone())
    x = torch.randn(3, 5, weight.shape[1], requires_grad=True)
    out = wide(x)
    expected = torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(expected)
    (gx, gw) = torch.autograd.grad(out, (x, wide.weight), grad_out)
    (ex, ew) = torch.autograd.grad(expected, (x, weight), grad_out)
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-4)


def test_greedy_decode_dropping_finished_rows_equals_generate(tiny, monkeypatch) -> None:
    """Rows that end early leave the batch and the cache; the rows left decode exactly `generate`'s tokens (a
    row reading another row's cache after the drop would not: the tiny model repeats its prompt's tokens)."""
    model, tok = tiny.model, tiny.tokenizer
    prompts = [[5 + 7 * i, 9 + 3 * i, 17 + 2 * i, 33, 40 + i][: 2 + i % 4] for i in range(12)]
    pad = int(tok.pad_token_id or 0)
    ids, mask = left_pad(prompts, pad)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    firsts = [int(t) for t in free[:, ids.shape[1]]]
    end = max(set(firsts), key=firsts.count)  # the commonest first token ends those rows at once
    assert 0.25 * len(prompts) <= firsts.count(end) < len(prompts)  # enough rows end to be dropped, not all
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad, eos_token_id=end
    )[:, ids.shape[1] :]  # fmt: skip
    prefix = prefill(model, prompts, pad)
    states: dict[str, list[torch.Tensor]] = {"dropping": [], "keeping": []}
    for run in states:  # the head's input rows at every step, with and without dropping finished rows
        monkeypatch.setattr(decode_module, "COMPACT_FRACTION", 0.25 if run == "dropping" else 2.0)
        hook = model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _o, run=run: states[run].append(args[0].detach().clone())
        )
        try:
            got = generate_after(model, prefix, None, 10, end, pad)
        finally:
            hook.remove()
        assert torch.equal(got, expected), run
    assert sum(bool((row == end).any()) for row in got) == firsts.count(end)
    # after the first step the ended rows are gone, and every row left sees exactly its own cache
    left = [row for row, first in enumerate(firsts) if first != end]
    assert [s.shape[0] for s in states["dropping"]] == [len(prompts)] + [len(left)] * 9
    for dropped, kept in zip(states["dropping"][1:], states["keeping"][1:], strict=True):
        torch.testing.assert_close(dropped, kept[left], rtol=1e-4, atol=1e-5)


def test_prompts_cached_in_different_batches_stack_into_a_batch_that_continues_as_one_prefill(tiny) -> None:
    """`unpadded` rows from two separate prefills, joined by `stack` in another order and padding, continue
    (teacher-forced and decoded) as the same prompts prefilled together."""
    model, pad = tiny.model, int(tiny.tokenizer.pad_token_id or 0)
    first, second = prefill(model, PROMPTS[:2], pad), prefill(model, PROMPTS[2:], pad)
    rows = [second.unpadded(0), first.unpadded(1), first.unpadded(0)]
    stacked = PromptPrefix.stack(rows)
    order = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    together = prefill(model, order, pad)
    assert stacked.ids == together.ids and torch.equal(stacked.mask, together.mask)
    answers = [[3, 4, 5], [6], [7, 8]]
    with torch.no_grad():
        a, starts_a = forward_suffix(model, stacked, None, answers)
        b, starts_b = forward_suffix(model, together, None, answers)
    assert starts_a == starts_b
    for row, answer in enumerate(answers):  # the real positions; padding differs by design
        span = slice(0, starts_a[row] + len(answer))
        torch.testing.assert_close(a[row, span], b[row, span], atol=1e-5, rtol=1e-4)
    eos, pad_id = int(tiny.tokenizer.eos_token_id), pad
    assert torch.equal(
        generate_after(model, stacked, None, 6, eos, pad_id), generate_after(model, together, None, 6, eos, pad_id)
    )
    # a row owns its storage: changing the batch it came from leaves it alone
    kept = rows[1].keys[0].clone()
    first.keys[0].zero_()
    assert torch.equal(rows[1].keys[0], kept)


def test_prompts_sharing_their_first_tokens_run_them_once_with_the_same_cache(tiny, monkeypatch) -> None:
    """The common head (a chat template's system block) runs as one row and each prompt's own tokens run
    batched after copies of its cache: keys, values and layer states at every real position, and what
    decodes from the cache, are those of one left-padded forward of the whole prompts."""
    model, tok = tiny.model, tiny.tokenizer
    pad, eos = int(tok.pad_token_id or 0), int(tok.eos_token_id)
    head = [20 + i for i in range(12)]
    prompts = [[*head, 5, 9, 17], [*head, 7], [*head, 11, 12, 13, 14, 15, 16], [*head[:10], 3, 4]]
    shapes: list[tuple[int, ...]] = []
    first_layer = model.base_model.layers[0]
    handle = first_layer.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(args[0].shape)),
                                                   with_kwargs=True)  # fmt: skip
    try:
        shared, states = prefill_states(model, prompts, pad, layer_index=1)
    finally:
        handle.remove()
    assert shapes[0][:2] == (1, 10)  # the ten tokens every prompt starts with, once
    assert shapes[1][:2] == (4, 7)  # then each prompt's own tokens but its last, left-padded
    monkeypatch.setattr(prefix_module, "SHARED_HEAD_MIN", 1000)
    plain, plain_states = prefill_states(model, prompts, pad, layer_index=1)
    assert states is not None and plain_states is not None
    assert torch.equal(shared.mask, plain.mask) and torch.equal(shared.last, plain.last)
    real = shared.mask[:, :-1].bool()
    for got, expected in zip([*shared.keys, *shared.values], [*plain.keys, *plain.values], strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(states[real], plain_states[real], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(
            generate_after(model, shared, None, 6, eos, pad), generate_after(model, plain, None, 6, eos, pad)
        )


def test_sampled_words_follow_the_softmax_and_never_a_zero_weight() -> None:
    """`sample_rows` draws each word in proportion to its weight (within 4.5 standard errors over 40k seeded
    draws), across block edges, for a weight 1e-3 of its row's total, and never a word of weight 0; and
    `pick_tokens` samples softmax(logits / T) with its entropy."""
    from llm_trm_core.lm.decode import pick_tokens
    from llm_trm_core.lm.sampling import SAMPLE_BLOCK, sample_rows

    width = 3 * SAMPLE_BLOCK + 17  # the last block is padded
    weights = torch.zeros(3, width)
    weights[0, [5, SAMPLE_BLOCK - 1, SAMPLE_BLOCK, width - 1]] = torch.tensor([1.0, 2.0, 0.5, 1.5])
    weights[1, 1::2] = 1.0  # every even word has weight 0
    weights[2, [10, 2 * SAMPLE_BLOCK + 3]] = torch.tensor([1e-3, 1.0])
    draws = 40_000
    torch.manual_seed(0)
    picked = torch.stack([sample_rows(weights) for _ in range(draws)])  # (draws, 3)
    counts = torch.stack([torch.bincount(picked[:, r], minlength=width) for r in range(3)]).double()
    expected = weights.double() / weights.double().sum(-1, keepdim=True)
    error = (expected * (1 - expected) / draws).sqrt()
    assert bool(((counts / draws - expected).abs() <= 4.5 * error + 1e-12).all())
    assert int(counts[weights == 0].sum()) == 0
    assert int(counts[2, 10]) > 0  # the small weight is drawn, at its rate
    torch.manual_seed(1)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9]])
    tokens = torch.stack([pick_tokens(logits, 0.5) for _ in range(20_000)]).squeeze(1)
    probs = (logits[0] / 0.5).softmax(-1)
    assert torch.allclose(torch.bincount(tokens, minlength=4).double() / 20_000, probs.double(), atol=0.012)
    entropy = torch.empty(1)
    pick_tokens(logits, 0.5, entropy)
    assert float(entropy) == pytest.approx(float(torch.special.entr(probs).sum()), rel=1e-5)


@pytest.mark.parametrize(("top_k", "top_p"), [(50, 0.95), (0, 0.8), (7, 1.0), (0, 1.0)])
def test_nucleus_keeps_what_the_transformers_warpers_keep(top_k: int, top_p: float) -> None:
    """`nucleus` gives the probabilities of transformers' temperature -> top-k -> top-p chain, word by word."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from llm_trm_core.lm.sampling import nucleus

    torch.manual_seed(0)
    scores = torch.randn(6, 3000) * 3
    scores[0, :5] = 20.0  # a row whose top-p set is a handful of tied words
    chain = [TemperatureLogitsWarper(0.7)]
    chain += [TopKLogitsWarper(top_k)] if top_k else []
    chain += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    warped = scores
    for warper in chain:
        warped = warper(torch.zeros(6, 1, dtype=torch.long), warped)
    expected = warped.softmax(-1)
    probs, words = nucleus(scores, 0.7, top_k, top_p)
    got = torch.zeros_like(scores).scatter_(1, words, probs / probs.sum(-1, keepdim=True))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(got > 0, expected > 0)


def test_generate_with_the_nucleus_draw_samples_only_kept_words_and_is_seeded(tiny) -> None:
    """A greedy `generate` ending in `NucleusDraw` draws from the nucleus: every token is one of the step's
    top-k words and not always the first, with top-k 1 it is greedy decoding, and the same seed gives the
    same tokens and another seed other ones."""
    from transformers import LogitsProcessorList

    from llm_trm_core.lm.sampling import NucleusDraw

    ids, mask = left_pad(PROMPTS, int(tiny.tokenizer.pad_token_id or 0))

    def run(seed: int, top_k: int, top_p: float) -> Any:
        draw = [NucleusDraw(1.0, top_k, top_p)] if top_k >= 0 else []
        torch.manual_seed(seed)
        return tiny.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
            pad_token_id=tiny.tokenizer.pad_token_id, logits_processor=LogitsProcessorList(draw),
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip

    sampled = run(0, 3, 1.0)
    new = sampled.sequences[:, ids.shape[1] :]
    top = torch.stack([step.topk(3).indices for step in sampled.logits], 1)  # (B, steps, 3), raw logits
    assert bool((new.unsqueeze(-1) == top).any(-1).all())  # always one of the 3 kept words
    assert bool((new != top[..., 0]).any())  # and not always the likeliest
    greedy = run(0, -1, 1.0).sequences
    assert torch.equal(run(0, 1, 1.0).sequences, greedy)
    assert torch.equal(run(0, 0, 0.9).sequences, run(0, 0, 0.9).sequences)
    assert not torch.equal(run(0, 0, 1.0).sequences, run(1, 0, 1.0).sequences)
