"""Deterministic splits by id: the same id always lands in the same split, on every machine."""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Iterator, Mapping


def unit_hash(id_: str, salt: str = "llm-trm-split-v1") -> float:
    """Uniform number in [0, 1) derived from an id (sha256, so stable across processes and platforms)."""
    digest = hashlib.sha256(f"{salt}:{id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def content_id(prefix: str, text: str) -> str:
    """A short, stable id for a piece of text (duplicates collapse to one id)."""
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def _positions(name: str, rank: int, size: int) -> Iterator[tuple[float, int, str, int]]:
    for i in range(size):
        yield (2 * i + 1) / (2 * size), rank, name, i


def interleave(sizes: Mapping[str, int]) -> Iterator[tuple[str, int]]:
    """Every (split, index within the split), ordered so that each prefix holds every split in proportion
    to its size: item i of a split of size N sits at (i + 1/2) / N, ties going to the split named first.

    The order depends on the sizes alone, and a longer prefix always extends a shorter one, so
    "the first n" is a stratified sample for every n and raising n never reorders what was taken.
    (IEEE division is correctly rounded, so equal fractions tie exactly on every machine.)
    """
    streams = [_positions(name, rank, size) for rank, (name, size) in enumerate(sizes.items()) if size > 0]
    return ((name, i) for _, _, name, i in heapq.merge(*streams))


def allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """How many of each split the first `n` of `interleave(sizes)` hold."""
    counts = dict.fromkeys(sizes, 0)
    for name, _ in itertools.islice(interleave(sizes), n):
        counts[name] += 1
    return counts
