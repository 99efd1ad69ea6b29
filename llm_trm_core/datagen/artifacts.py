"""Readers of the committed `datagen-shard` and `datagen` artifacts: generation rows and uncompressed
(pre, post) states, streamed part by part in problem-index order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from llm_trm_core.arrow import iter_parquet, read_parquet
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import table_to_pairs
from llm_trm_core.errors import UserError
from llm_trm_core.store import Artifact, ArtifactStore, ArtifactWriter, Manifest

SHARD_STAGE = "datagen-shard"


def iter_shard_rows(source: Artifact | ArtifactWriter, files: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Generation rows of a shard: committed (an Artifact) or being written (its writer), each part verified."""
    for name in sorted(f for f in files if f.startswith("rows/")):
        yield from read_parquet(source, name).to_pylist()


def shard_manifests(store: ArtifactStore, datagen: Manifest) -> list[Manifest]:
    keys = [datagen.upstream[name] for name in sorted(datagen.upstream) if name.startswith("shard-")]
    out = []
    for key in keys:
        manifest = store.read_manifest(SHARD_STAGE, key)
        if manifest is None:
            raise UserError(f"datagen artifact {datagen.uri} refers to shard {key}, which is not committed")
        out.append(manifest)
    return out


def iter_rows(store: ArtifactStore, datagen: Manifest) -> Iterator[dict[str, Any]]:
    """Every generation row, in problem-index order (streams part by part)."""
    for shard in shard_manifests(store, datagen):
        yield from iter_shard_rows(store.open(SHARD_STAGE, shard.key), shard.files)


def iter_pair_states(store: ArtifactStore, datagen: Manifest) -> Iterator[PairStates]:
    """Uncompressed (pre, post) states of every successful row (streams part by part)."""
    for shard in shard_manifests(store, datagen):
        artifact = store.open(SHARD_STAGE, shard.key)
        for table in iter_parquet(artifact, artifact.files("states/"), page_checksums=False):
            yield from table_to_pairs(table)
