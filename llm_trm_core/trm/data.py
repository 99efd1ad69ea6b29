"""Padded batches of compressed pairs, streamed file by file from a `pairs` artifact.

Memory holds one Parquet file (≤ pairs.rows_per_shard pairs) plus one batch, whatever the dataset size.
With a seed, file order and rows within a file are shuffled by a generator seeded from (seed, epoch),
so the order is a pure function of the epoch and a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llm_trm_core.arrow import read_parquet
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import pairs_dim, table_to_pairs
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


def collate(pairs: list[PairStates]) -> PairBatch:
    width = max(max(p.pre.shape[0] for p in pairs), 1)
    d = pairs[0].post.shape[0]
    pre = torch.zeros(len(pairs), width, d)
    mask = torch.zeros(len(pairs), width)
    for i, pair in enumerate(pairs):
        pre[i, : pair.pre.shape[0]] = pair.pre
        mask[i, : pair.pre.shape[0]] = 1
    return PairBatch([p.id for p in pairs], pre, mask, torch.stack([p.post for p in pairs]))


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

    def _file_pairs(self, name: str) -> list[PairStates]:
        table = read_parquet(self.artifact, name, page_checksums=False)  # digest-verified
        size = pairs_dim(table.schema)
        if size != self.d_prime:
            raise UserError(
                f"{self.artifact.file_uri(name)} holds vectors of size {size}, but the artifact says "
                f"D'={self.d_prime}: the shards come from different compressors; recompute the pairs stage"
            )
        if table.num_rows == 0:
            raise UserError(f"{self.artifact.file_uri(name)} is an empty shard; recompute the pairs stage")
        return list(table_to_pairs(table))

    def iter_pairs(self, split: str) -> Iterator[PairStates]:
        for name in self.meta["files"].get(split, []):
            yield from self._file_pairs(name)

    def iter_batches(self, split: str, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[PairBatch]:
        names = list(self.meta["files"].get(split, []))
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            names = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
        pending: list[PairStates] = []
        for name in names:
            pairs = self._file_pairs(name)
            if generator is not None:
                pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=generator).tolist()]
            pending.extend(pairs)
            while len(pending) >= batch_size:
                yield collate(pending[:batch_size])
                pending = pending[batch_size:]
        if pending:
            yield collate(pending)

    def batches_per_epoch(self, split: str, batch_size: int) -> int:
        return -(-self.count(split) // batch_size)
