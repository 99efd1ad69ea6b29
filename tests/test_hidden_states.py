"""Hidden-state extraction and the sharded Parquet format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_trm_core.config import load_config
from llm_trm_core.data.corpus import Document
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import (
    HiddenStates,
    ShardedStatesWriter,
    chunk_documents,
    extract_states,
    lm_head_of,
    resolve_layer,
    write_lm_head,
)
from llm_trm_core.lm import load_language_model
from llm_trm_core.store import ArtifactStore


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    return load_language_model(cfg.model, cfg.runtime)


def test_batched_extraction_equals_one_sequence_at_a_time(tiny) -> None:
    docs = [Document(f"d{i}", "train", "word " * (3 + 7 * i)) for i in range(5)]
    chunks, n_docs = chunk_documents(docs, tiny.tokenizer, max_tokens=16)
    assert n_docs == 5 and all(2 <= len(c.input_ids) <= 16 for c in chunks)
    assert sum(len(c.input_ids) for c in chunks) == sum(len(tiny.tokenizer(d.text).input_ids) for d in docs)
    batched = {id(c): s for c, s in extract_states(tiny.model, chunks, 2, batch_size=4, pad_id=0)}
    for chunk in chunks:
        (alone,) = [s for _, s in extract_states(tiny.model, [chunk], 2, batch_size=1, pad_id=0)]
        assert alone.shape == (len(chunk.input_ids), 64)  # one row per real token: padding is never kept
        torch.testing.assert_close(batched[id(chunk)], alone, atol=1e-5, rtol=1e-4)


def test_last_layer_is_what_the_lm_head_reads(tiny) -> None:
    ids = torch.tensor([tiny.tokenizer("a short text").input_ids])
    out = tiny.model(input_ids=ids, output_hidden_states=True)
    last = resolve_layer(-1, tiny.info.num_layers)
    head = lm_head_of(tiny.model, last, tiny.info.num_layers)
    assert head.norm_weight is None
    torch.testing.assert_close(head.logits(out.hidden_states[last][0]), out.logits[0], atol=1e-4, rtol=1e-4)
    inner = lm_head_of(tiny.model, 1, tiny.info.num_layers)
    assert inner.norm_weight is not None  # an inner layer goes through the final norm first (logit lens)
    with pytest.raises(UserError, match="outside the model's hidden states"):
        resolve_layer(5, tiny.info.num_layers)


def _write(store: ArtifactStore, rows_per_shard: int, dtype: str = "float32") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    data = torch.randn(103, 8, generator=g)
    with store.writer("hiddens", "k", config={}, code_version="1") as w:
        shards = ShardedStatesWriter(w, 8, dtype, rows_per_shard)
        start = 0
        for i, n in enumerate([10, 40, 3, 50]):
            shards.add("train", f"doc{i}", np.arange(n), data[start : start + n])
            start += n
        g2 = torch.Generator().manual_seed(1)
        shards.add("val", "v", np.arange(7), torch.randn(7, 8, generator=g2))
        head = write_lm_head(w, lm_head_of_dummy())
        shards.close({"lm_head": head})
        w.commit()
    return data


def lm_head_of_dummy():
    from llm_trm_core.metrics import LMHead

    return LMHead(torch.ones(5, 8))


def test_shards_round_trip_and_stream(tmp_path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    data = _write(store, rows_per_shard=32)
    states = HiddenStates.open(store.open("hiddens", "k"))
    assert states.hidden_size == 8 and states.tokens("train") == 103 and states.tokens("val") == 7
    assert len(states.shards("train")) == 4  # 32 + 32 + 32 + 7
    torch.testing.assert_close(torch.cat(list(states.iter_rows("train"))), data)
    assert states.lm_head() is not None

    # unshuffled batches cover the rows in order; the last batch carries the remainder
    batches = list(states.iter_batches("train", 25))
    assert [b.shape[0] for b in batches] == [25, 25, 25, 25, 3] == [25] * 4 + [103 - 100]
    assert states.batches_per_epoch("train", 25) == len(batches)

    # shuffled: a pure function of (seed, epoch), every row exactly once per epoch
    e0 = torch.cat(list(states.iter_batches("train", 25, seed=3, epoch=0)))
    assert torch.equal(e0, torch.cat(list(states.iter_batches("train", 25, seed=3, epoch=0))))
    assert not torch.equal(e0, torch.cat(list(states.iter_batches("train", 25, seed=3, epoch=1))))
    assert torch.equal(e0[e0[:, 0].argsort()], data[data[:, 0].argsort()])  # a permutation of the rows

    # two ranks split each global batch
    full = list(states.iter_batches("train", 25, seed=3, epoch=0))
    r0 = list(states.iter_batches("train", 25, seed=3, epoch=0, rank=0, world_size=2))
    r1 = list(states.iter_batches("train", 25, seed=3, epoch=0, rank=1, world_size=2))
    for whole, a, b in zip(full, r0, r1, strict=True):
        assert a.shape[0] + b.shape[0] == whole.shape[0]
        assert torch.equal(torch.cat([a, b]).sort(0).values, whole.sort(0).values)


def _batches_permuting_whole_shards(states: HiddenStates, batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batches of `iter_batches`, computed the plain way: each shard permuted whole, then concatenated."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    names = states.shards("train")
    names = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    rows = torch.cat([(r := states.read_shard(n))[torch.randperm(r.shape[0], generator=generator)] for n in names])
    return list(rows.split(batch))


def test_shards_store_raw_vectors_read_as_aligned_views_and_stream_the_plain_batches(tmp_path) -> None:
    """The state column is uncompressed fixed_size_binary (D float32 each); a shard reads as one aligned
    view of the decoded buffer; streaming (one shard plus one batch in memory) yields exactly the batches
    of permuting every shard whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = ArtifactStore(f"file://{tmp_path}")
    data = _write(store, rows_per_shard=32)
    states = HiddenStates.open(store.open("hiddens", "k"))
    path = states.artifact.path(states.shards("train")[0])
    schema, meta = pq.read_schema(path), pq.read_metadata(path)
    assert schema.field("state").type == pa.binary(8 * 4) and schema.metadata[b"dtype"] == b"float32"
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"UNCOMPRESSED"}
    shard = states.read_shard(states.shards("train")[0])
    assert shard.dtype == torch.float32 and shard.is_contiguous() and shard.data_ptr() % 64 == 0
    torch.testing.assert_close(shard, data[:32], rtol=0, atol=0)
    for batch in (25, 40, 70, 200):
        expected = _batches_permuting_whole_shards(states, batch, seed=5, epoch=2)
        got = list(states.iter_batches("train", batch, seed=5, epoch=2))
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_float16_cache_and_non_finite_states_are_refused(tmp_path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    data = _write(store, rows_per_shard=64, dtype="float16")
    states = HiddenStates.open(store.open("hiddens", "k"))
    torch.testing.assert_close(torch.cat(list(states.iter_rows("train"))), data, atol=2e-3, rtol=1e-3)

    w = store.writer("hiddens", "bad", config={}, code_version="1")
    shards = ShardedStatesWriter(w, 8, "float32", 16)
    bad = torch.zeros(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(UserError, match="NaN or Inf"):
        shards.add("train", "docX", np.arange(3), bad)
    with pytest.raises(UserError, match="NaN or Inf"):  # a float16 overflow is caught too
        ShardedStatesWriter(w, 8, "float16", 16).add("train", "big", np.arange(1), torch.full((1, 8), 1e6))
    assert not store.is_committed("hiddens", "bad")


def test_layer_capture_equals_output_hidden_states(tiny) -> None:
    from llm_trm_core.hidden_states import capture_layer

    ids = torch.tensor([tiny.tokenizer("some text to run through the model").input_ids])
    reference = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    for index in range(tiny.info.num_layers + 1):
        with capture_layer(tiny.model, index) as captured:
            tiny.model.base_model(input_ids=ids)
        assert len(captured) == 1
        torch.testing.assert_close(captured[0], reference[index])
