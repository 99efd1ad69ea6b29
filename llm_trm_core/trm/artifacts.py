"""Readers of the committed `trm` artifact, and the LM head its compressed vectors are read through."""

from __future__ import annotations

import json

from safetensors.torch import load as load_safetensors

from llm_trm_core.compressor.artifacts import load_compressor
from llm_trm_core.hidden_states import HiddenStates
from llm_trm_core.models.trm import SequenceTRM
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.trm.train import DecompressedHead, Head

STATE_STAGES = ("hiddens", "trace-hiddens")


def load_trm(store: ArtifactStore, manifest: Manifest) -> SequenceTRM:
    artifact = store.open(manifest.stage, manifest.key)
    model = SequenceTRM(**json.loads(artifact.read_bytes("config.json")))
    model.load_state_dict(load_safetensors(artifact.read_bytes("model.safetensors")))
    return model.eval()


def lm_head_for(store: ArtifactStore, compressor: Manifest) -> Head | None:
    """Decompress + the LM head stored with the hidden states the compressor was fitted on."""
    key = compressor.upstream.get("hiddens")
    for stage in STATE_STAGES:
        if key and store.read_manifest(stage, key) is not None:
            head = HiddenStates.open(store.open(stage, key)).lm_head()
            return DecompressedHead(load_compressor(store, compressor), head) if head else None
    return None
