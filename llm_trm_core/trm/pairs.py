"""The `pairs` artifact's format: its Parquet schema, its metadata file, and a handle on a committed one.

Written by the `pairs` stage (llm_trm_core/stages/pairs.py), read by TRM training (llm_trm_core/trm/data.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llm_trm_core.arrow import pair_schema
from llm_trm_core.store import Artifact, ArtifactStore, Manifest

PAIRS_STAGE = "pairs"
SCHEMA_NAME = "llm-trm/pairs"
SCHEMA_VERSION = "2"  # 2: vectors as fixed_size_binary / binary, uncompressed (llm_trm_core.arrow)
META_FILE = "pairs.json"


def pairs_schema(d_prime: int, dtype: str, metadata: dict[str, str]) -> pa.Schema:
    return pair_schema(d_prime, dtype, SCHEMA_NAME, SCHEMA_VERSION, metadata)


@dataclass
class PairsReader:
    """A committed `pairs` artifact: its files and metadata. `PairData` (llm_trm_core/trm/data.py) reads the
    pairs themselves, as flat columns, batches or one `PairStates` per pair."""

    store: ArtifactStore
    manifest: Manifest

    @functools.cached_property
    def artifact(self) -> Artifact:
        return self.store.open(PAIRS_STAGE, self.manifest.key)  # verified once

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        return dict(json.loads(self.artifact.read_bytes(META_FILE)))

    def files(self, split: str) -> list[str]:
        return [self.artifact.file_uri(n) for n in self.meta["files"].get(split, [])]
