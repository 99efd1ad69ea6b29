"""Readers of the committed `hiddens`/`trace-hiddens`, `basis` and `compressor` artifacts."""

from __future__ import annotations

from safetensors.torch import load as load_safetensors

from llm_trm_core.compressor.moments import Basis
from llm_trm_core.hidden_states import HiddenStates
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.store import ArtifactStore, Manifest

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BASIS_FILE = "basis.safetensors"
BASIS_META_FILE = "basis.json"


def open_hiddens(store: ArtifactStore, manifest: Manifest) -> HiddenStates:
    return HiddenStates.open(store.open(manifest.stage, manifest.key))


def load_basis(store: ArtifactStore, manifest: Manifest) -> Basis:
    artifact = store.open(manifest.stage, manifest.key)
    tensors = load_safetensors(artifact.read_bytes(BASIS_FILE))
    meta = artifact.read_json(BASIS_META_FILE)
    return Basis(
        tensors["components"], tensors["eigenvalues"], tensors["mean"], int(meta["count"]), bool(meta["centered"])
    )


def load_compressor(store: ArtifactStore, manifest: Manifest) -> LinearCompressor:
    artifact = store.open(manifest.stage, manifest.key)
    return LinearCompressor.from_bytes(artifact.read_bytes(WEIGHTS_FILE), artifact.read_bytes(CONFIG_FILE))
