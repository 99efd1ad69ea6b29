"""Padded batches of compressed pairs, streamed file by file from a `pairs` artifact.

A file is read as flat columns (`PairColumns`: every pair's pre rows one after another, their start
offsets, the post vectors), zero-copy views of the decoded Parquet buffers. Each pair's rows are a view
made by one `split` call per file, and a batch is padded from them by one `pad_sequence` call; no
`PairStates` is built on the training path.

Memory holds one Parquet file (≤ pairs.rows_per_shard pairs), the next file's bytes when files are large
enough to be read ahead on a helper thread (`llm_trm_core.arrow.iter_parquet`) and one batch, whatever the
dataset size.
With a seed, file order and rows within a file are shuffled by a generator seeded from (seed, epoch),
so the order is a pure function of the epoch and a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch.nn.utils.rnn import pad_sequence

from llm_trm_core.arrow import iter_parquet, read_parquet
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import PairColumns, pairs_dim, table_to_columns
from llm_trm_core.errors import UserError
from llm_trm_core.trm.pairs import PairsReader


@dataclass
class PairBatch:
    ids: list[str]
    pre: torch.Tensor  # (B, L, D') zero-padded
    mask: torch.Tensor  # (B, L) 1 for real positions
    post: torch.Tensor  # (B, D')

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.ids, self.pre.to(device), self.mask.to(device), self.post.to(device))


# Some pairs of one file: the file's columns and the indices of the chosen pairs, in batch order.
Selection = tuple[PairColumns, torch.Tensor]


def collate(parts: Sequence[Selection]) -> PairBatch:
    """One padded batch of the selected pairs, in order (parts from consecutive files are concatenated).

    pre[b, :len_b] is pair b's rows and zeros after; mask is 1 on the real positions."""
    ids, pres = [], []
    for columns, index in parts:
        chosen = index.tolist()
        ids += [columns.ids[i] for i in chosen]
        pres += [columns.pres[i] for i in chosen]
    post = torch.cat([columns.post[index] for columns, index in parts])
    lengths = torch.tensor([len(p) for p in pres])
    pre = pad_sequence(pres, batch_first=True)  # one C++ pass: zeros, then each pair's rows
    if pre.shape[1] == 0:  # every pre is empty: one zero position, masked out
        pre = pre.new_zeros(len(pres), 1, post.shape[1])
    mask = (torch.arange(pre.shape[1]) < lengths[:, None]).to(pre.dtype)
    return PairBatch(ids, pre, mask, post)


class PairData:
    def __init__(self, reader: PairsReader) -> None:
        self.reader = reader
        self.meta = reader.meta
        self.artifact = reader.artifact
        self.d_prime = int(self.meta["d_prime"])

    def count(self, split: str) -> int:
        return int(self.meta["pairs"].get(split, 0))

    def require(self, *splits: str) -> None:
        empty = [s for s in splits if self.count(s) == 0]
        if empty:
            raise UserError(
                f"the pairs artifact {self.artifact.uri} has no {'/'.join(empty)} pairs "
                f"(counts: {self.meta['pairs']}); generate more problems (datagen.num_problems) "
                "so every split gets some"
            )

    def file_columns(self, name: str) -> PairColumns:
        """One file of the artifact, digest-verified, as flat columns."""
        return self._columns(name, read_parquet(self.artifact, name, page_checksums=False))

    def _columns(self, name: str, table: pa.Table) -> PairColumns:
        size = pairs_dim(table.schema)
        if size != self.d_prime:
            raise UserError(
                f"{self.artifact.file_uri(name)} holds vectors of size {size}, but the artifact says "
                f"D'={self.d_prime}: the shards come from different compressors; recompute the pairs stage"
            )
        if table.num_rows == 0:
            raise UserError(f"{self.artifact.file_uri(name)} is an empty shard; recompute the pairs stage")
        return table_to_columns(table)

    def _iter_files(self, names: list[str]) -> Iterator[PairColumns]:
        """The files in this order, digest-verified, each read while the caller works on the one before."""
        return map(self._columns, names, iter_parquet(self.artifact, names, page_checksums=False))  # keeps no file

    def iter_columns(self, split: str) -> Iterator[PairColumns]:
        return self._iter_files(list(self.meta["files"].get(split, [])))

    def iter_pairs(self, split: str) -> Iterator[PairStates]:
        for columns in self.iter_columns(split):
            yield from columns.pairs()

    def iter_batches(self, split: str, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[PairBatch]:
        names = list(self.meta["files"].get(split, []))
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            names = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
        pending: list[Selection] = []  # pairs read but not yet batched, in order (at most two files)
        for columns in self._iter_files(names):
            n = len(columns)
            pending.append((columns, torch.arange(n) if generator is None else torch.randperm(n, generator=generator)))
            while sum(len(index) for _, index in pending) >= batch_size:
                batch, pending = _take(pending, batch_size)
                yield collate(batch)
        if pending:
            yield collate(pending)

    def batches_per_epoch(self, split: str, batch_size: int) -> int:
        return -(-self.count(split) // batch_size)


def _take(pending: list[Selection], n: int) -> tuple[list[Selection], list[Selection]]:
    """The first n pending pairs, and the rest (neither holds an empty selection)."""
    taken: list[Selection] = []
    rest: list[Selection] = []
    for columns, index in pending:
        k = min(n, len(index))
        n -= k
        if k:
            taken.append((columns, index[:k]))
        if k < len(index):
            rest.append((columns, index[k:]))
    return taken, rest
