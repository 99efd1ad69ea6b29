"""Deterministic splits by id: the same id always lands in the same split, on every machine."""

from __future__ import annotations

import hashlib


def unit_hash(id_: str, salt: str = "llm-trm-split-v1") -> float:
    """Uniform number in [0, 1) derived from an id (sha256, so stable across processes and platforms)."""
    digest = hashlib.sha256(f"{salt}:{id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def content_id(prefix: str, text: str) -> str:
    """A short, stable id for a piece of text (duplicates collapse to one id)."""
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"
