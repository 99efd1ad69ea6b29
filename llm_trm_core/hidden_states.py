"""Token-level hidden states as sharded Parquet in the artifact store: written once, streamed many times.

Layout inside an artifact:
    hidden_states.json                 {hidden_size, layer, dtype, tokens: {split: n}, shards: {split: [...]}}
    lm_head.safetensors                the LM's output head (+ final norm gain for inner layers), for metrics
    states/{split}/part-00000.parquet  rows: doc_id, position, state (D floats as fixed_size_binary,
                                       uncompressed: llm_trm_core.arrow)
Only real tokens are stored: padding never reaches a loss or a metric.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_trm_core.arrow import STATE_WRITE_OPTIONS, column_rows, iter_parquet, read_parquet, vector_array, vector_type
from llm_trm_core.errors import UserError
from llm_trm_core.metrics import LMHead
from llm_trm_core.store import Artifact, ArtifactStore, ArtifactWriter

logger = logging.getLogger(__name__)

SCHEMA_NAME = "llm-trm/hidden-states"
SCHEMA_VERSION = "2"  # 2: state as fixed_size_binary, uncompressed (was a zstd list<float>)
META_FILE = "hidden_states.json"
HEAD_FILE = "lm_head.safetensors"
NP_DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32}


def states_schema(hidden_size: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("state", vector_type(hidden_size, dtype), nullable=False),
        ],
        metadata={"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "dtype": dtype},
    )


def resolve_layer(layer: int, num_layers: int) -> int:
    """hidden_states index in [0, num_layers]; negative counts from the end (-1 = last, post final norm)."""
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= index <= num_layers:
        raise UserError(f"compressor.layer={layer} is outside the model's hidden states 0..{num_layers} (or -1..)")
    return index


def lm_head_of(model: PreTrainedModel, layer_index: int, num_layers: int) -> LMHead:
    """The output head; for inner layers also the final RMSNorm (a logit lens)."""
    weight = model.get_output_embeddings().weight.detach().to("cpu", torch.float32)
    if layer_index == num_layers:
        return LMHead(weight)
    norm = getattr(model.base_model, "norm", None)
    if norm is None or not hasattr(norm, "weight"):
        raise UserError("this model has no final RMSNorm to apply before the LM head; use compressor.layer=-1")
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))
    return LMHead(weight, norm.weight.detach().to("cpu", torch.float32), eps)


def cast_states(doc_id: str, states: torch.Tensor, hidden_size: int, dtype: str) -> np.ndarray:
    """`states` ((n, D)) as stored dtype `dtype` (what `ShardedStatesWriter.add` buffers); UserError on NaN/Inf."""
    if states.ndim != 2 or states.shape[1] != hidden_size:
        raise ValueError(f"states must be (n, {hidden_size}), got {tuple(states.shape)}")
    with np.errstate(over="ignore"):  # an overflow to inf is reported just below
        array = states.detach().to("cpu", torch.float32).numpy().astype(NP_DTYPES.get(dtype, np.float32), copy=False)
    if not np.isfinite(array).all():
        raise UserError(
            f"the hidden states of document {doc_id} contain NaN or Inf (after casting to {dtype}); "
            "use compressor.cache_dtype=float32 or check the model's dtype"
        )
    return array


class ShardedStatesWriter:
    """Buffers token states per split and writes fixed-size Parquet shards through an ArtifactWriter."""

    def __init__(self, writer: ArtifactWriter, hidden_size: int, dtype: str, rows_per_shard: int) -> None:
        self.writer = writer
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.rows_per_shard = rows_per_shard
        self.schema = states_schema(hidden_size, dtype)
        self._buffers: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
        self._buffered: dict[str, int] = {}
        self.shards: dict[str, list[str]] = {}
        self.tokens: dict[str, int] = {}

    def add(self, split: str, doc_id: str, positions: np.ndarray, states: torch.Tensor) -> None:
        self.add_array(split, doc_id, positions, self.cast(doc_id, states))

    def cast(self, doc_id: str, states: torch.Tensor) -> np.ndarray:
        return cast_states(doc_id, states, self.hidden_size, self.dtype)

    def add_array(self, split: str, doc_id: str, positions: np.ndarray, array: np.ndarray) -> None:
        """Buffer states already cast by `cast` (a unit committed earlier, replayed in order)."""
        self._buffers.setdefault(split, []).append((doc_id, positions.astype(np.int32), array))
        self._buffered[split] = self._buffered.get(split, 0) + len(array)
        self.tokens[split] = self.tokens.get(split, 0) + len(array)
        while self._buffered[split] >= self.rows_per_shard:
            self._flush(split, self.rows_per_shard)

    def _flush(self, split: str, rows: int) -> None:
        ids, positions, states = [], [], []
        taken = 0
        buffer = self._buffers[split]
        while taken < rows and buffer:
            doc_id, pos, arr = buffer[0]
            n = min(rows - taken, len(arr))
            ids.extend([doc_id] * n)
            positions.append(pos[:n])
            states.append(arr[:n])
            taken += n
            if n == len(arr):
                buffer.pop(0)
            else:
                buffer[0] = (doc_id, pos[n:], arr[n:])
        self._buffered[split] -= taken
        table = pa.table(
            {
                "doc_id": pa.array(ids, pa.string()),
                "position": pa.array(np.concatenate(positions), pa.int32()),
                "state": vector_array(np.concatenate(states), self.dtype, self.hidden_size),
            },
            schema=self.schema,
        )
        name = f"states/{split}/part-{len(self.shards.get(split, [])):05d}.parquet"
        with self.writer.open(name) as f:
            pq.write_table(table, f, **STATE_WRITE_OPTIONS)
        self.shards.setdefault(split, []).append(name)

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        for split in list(self._buffers):
            if self._buffered.get(split, 0):
                self._flush(split, self._buffered[split])
        meta = {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "tokens": self.tokens,
            "shards": self.shards,
            **(extra or {}),
        }
        self.writer.write_json(META_FILE, meta)
        return meta


def write_lm_head(writer: ArtifactWriter, head: LMHead) -> dict[str, Any]:
    """Save the head; returns the meta entry to put in hidden_states.json."""
    tensors = {"weight": head.weight.contiguous()}
    if head.norm_weight is not None:
        tensors["norm_weight"] = head.norm_weight.contiguous()
    writer.write_bytes(HEAD_FILE, save_safetensors(tensors))
    return {"file": HEAD_FILE, "norm_eps": head.norm_eps, "final_norm": head.norm_weight is not None}


HEAD_STAGE = "lm-head"


def ensure_lm_head(store: ArtifactStore, key: str, head: LMHead, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Store the LM head once, as its own artifact (`lm-head/{key}`, key = model + layer), in the model's dtype
    (bfloat16 on GPU: exact, half the bytes of float32), unless it is already there; returns the meta entry a
    hidden-states artifact records instead of a copy (SmolLM3-3B's head is 128256 x 2048: 1 GB in float32)."""
    if store.read_manifest(HEAD_STAGE, key) is None:
        tensors = {"weight": head.weight.to(dtype).contiguous()}
        if head.norm_weight is not None:
            tensors["norm_weight"] = head.norm_weight.contiguous()
        with store.writer(HEAD_STAGE, key, config={"dtype": str(dtype)}, code_version="1") as writer:
            writer.write_bytes(HEAD_FILE, save_safetensors(tensors))
            writer.commit({"vocab": int(head.weight.shape[0]), "hidden_size": int(head.weight.shape[1])})
    return {
        "stage": HEAD_STAGE,
        "key": key,
        "file": HEAD_FILE,
        "norm_eps": head.norm_eps,
        "final_norm": head.norm_weight is not None,
    }


def states_from_table(table: pa.Table, hidden_size: int) -> torch.Tensor:
    """The `state` column of a shard as a float32 (rows, D) tensor (a zero-copy view for float32 shards)."""
    return column_rows(table.column("state"), hidden_size)


@dataclass
class HiddenStates:
    """Reader over a committed hidden-states artifact."""

    artifact: Artifact
    meta: dict[str, Any]

    @classmethod
    def open(cls, artifact: Artifact) -> HiddenStates:
        meta = artifact.read_json(META_FILE)
        if meta.get("schema") != SCHEMA_NAME or meta.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"{artifact.uri} holds schema {meta.get('schema')} v{meta.get('schema_version')}, expected "
                f"{SCHEMA_NAME} v{SCHEMA_VERSION}; recompute it with this version of llm-trm"
            )
        return cls(artifact, meta)

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    def tokens(self, split: str) -> int:
        return int(self.meta["tokens"].get(split, 0))

    def shards(self, split: str) -> list[str]:
        return list(self.meta["shards"].get(split, []))

    def lm_head(self) -> LMHead | None:
        entry = self.meta.get("lm_head")
        if not entry:
            return None
        # stored once under lm-head/{key} (hidden-states v3), or inside the artifact (earlier versions)
        source = self.artifact.store.open(entry["stage"], entry["key"]) if "key" in entry else self.artifact
        tensors = load_safetensors(source.read_bytes(entry["file"]))
        norm = tensors.get("norm_weight")
        return LMHead(tensors["weight"].float(), None if norm is None else norm.float(), float(entry["norm_eps"]))

    def read_shard(self, name: str) -> torch.Tensor:
        """All states of one shard as a float32 (rows, D) tensor."""
        # No finiteness pass here: the writer refuses NaN/Inf (`cast_states`) and the digest proves these are
        # its bytes.
        table = read_parquet(self.artifact, name, columns=["state"], page_checksums=False)  # digest-verified
        return states_from_table(table, self.hidden_size)

    def iter_rows(self, split: str) -> Iterator[torch.Tensor]:
        """Every shard of a split in order (memory: one shard, and the next one's bytes when read ahead)."""
        return self._iter_shards(self.shards(split))

    def _iter_shards(self, names: list[str]) -> Iterator[torch.Tensor]:
        """The shards in this order, each verified before it is parsed; shards of at least 4 MiB are read and
        verified on a helper thread while the caller works on the one before (`iter_parquet`)."""
        tables = iter_parquet(self.artifact, names, columns=["state"], page_checksums=False)
        return map(functools.partial(states_from_table, hidden_size=self.hidden_size), tables)  # keeps no shard

    def iter_batches(
        self,
        split: str,
        batch_tokens: int,
        *,
        seed: int | None = None,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Global batches of `batch_tokens` rows (this rank's slice). With a seed, shard order and rows
        are shuffled by a generator seeded from (seed, epoch): the order is a pure function of the epoch,
        so a resumed run sees exactly the batches an uninterrupted one would."""
        names = self.shards(split)
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            names = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
        # Memory: one shard (as read), the next one's bytes (when read ahead) and one batch. Shuffled rows are
        # gathered batch by batch instead of permuting the whole shard, and the remainder carried into the
        # next shard is copied out, so the previous shard is freed before the next one is parsed.
        carry: torch.Tensor | None = None
        for rows in self._iter_shards(names):
            n = rows.shape[0]
            order = torch.randperm(n, generator=generator) if generator is not None else None

            def take(a: int, b: int, rows: torch.Tensor = rows, order: torch.Tensor | None = order) -> torch.Tensor:
                return rows[a:b] if order is None else rows[order[a:b]]

            start = 0
            if carry is not None:
                start = min(batch_tokens - carry.shape[0], n)
                carry = torch.cat([carry, take(0, start)])
                if carry.shape[0] < batch_tokens:
                    continue
                yield carry[rank::world_size]
                carry = None
            full = start + (n - start) // batch_tokens * batch_tokens
            for a in range(start, full, batch_tokens):
                yield take(a, a + batch_tokens)[rank::world_size]
            carry = take(full, n).clone() if full < n else None
            del rows, order, take
        if carry is not None and carry.shape[0]:
            yield carry[rank::world_size]

    def batches_per_epoch(self, split: str, batch_tokens: int) -> int:
        return math.ceil(self.tokens(split) / batch_tokens)


@dataclass(frozen=True)
class TextChunk:
    doc_id: str
    split: str
    input_ids: list[int]
    keep_from: int = 0  # states before this position are computed (as context) but not stored


def chunk_documents(
    docs: Iterable[Any], tokenizer: PreTrainedTokenizerBase, max_tokens: int, max_doc_tokens: int | None = None
) -> tuple[list[TextChunk], int]:
    """Tokenize documents, keep at most max_doc_tokens of each (None: all), and cut them into chunks of at
    most max_tokens. Returns (chunks, documents)."""
    chunks: list[TextChunk] = []
    n_docs = 0
    for doc in docs:
        n_docs += 1
        ids = tokenizer(doc.text, add_special_tokens=False).input_ids
        if max_doc_tokens is not None:
            ids = ids[:max_doc_tokens]
        for start in range(0, len(ids), max_tokens):
            piece = ids[start : start + max_tokens]
            if len(piece) >= 2:
                chunks.append(TextChunk(doc.id, doc.split, piece))
    return chunks, n_docs


def layer_module(model: PreTrainedModel, layer_index: int) -> torch.nn.Module:
    """The module whose output is `hidden_states[layer_index]`: the embeddings (0), a decoder layer, or the
    final norm (last index: what the LM head reads)."""
    base: Any = model.base_model
    layers = base.layers
    if layer_index == 0:
        return base.get_input_embeddings()
    if layer_index == len(layers):
        return base.norm
    return layers[layer_index - 1]


@contextmanager
def capture_layer(model: PreTrainedModel, layer_index: int) -> Iterator[list[torch.Tensor]]:
    """Record the output of one layer for every forward call inside the block (one tensor per call).

    Only that layer's activations are kept, instead of `output_hidden_states=True` keeping all of them.
    """
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = layer_module(model, layer_index).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def extract_states(
    model: PreTrainedModel, chunks: list[TextChunk], layer_index: int, batch_size: int, pad_id: int
) -> Iterator[tuple[TextChunk, torch.Tensor]]:
    """(chunk, (len, D) states) for every chunk, batched by length with right padding.

    Right padding keeps every real token at its unpadded position, so batched states equal the
    states of the chunk run alone.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(chunks)), key=lambda i: (-len(chunks[i].input_ids), i))
    for start in tqdm(range(0, len(order), batch_size), desc="hidden states", unit="batch", disable=None):
        batch = [chunks[i] for i in order[start : start + batch_size]]
        width = max(len(c.input_ids) for c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, chunk in enumerate(batch):
            ids[row, : len(chunk.input_ids)] = torch.tensor(chunk.input_ids)
            mask[row, : len(chunk.input_ids)] = 1
        with capture_layer(model, layer_index) as captured:
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))  # no vocabulary head needed
        states = captured[0]
        for row, chunk in enumerate(batch):
            yield chunk, states[row, : len(chunk.input_ids)].float().cpu()
