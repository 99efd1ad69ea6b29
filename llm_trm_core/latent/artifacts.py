"""Building the latent reasoner from committed artifacts: compressor + TRM (+ the `latent` projection, LoRA,
and GRPO weights laid over it), and the lineage checks that keep them from one pipeline run."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from llm_trm_core.compressor.artifacts import load_compressor
from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import resolve_layer
from llm_trm_core.latent.reasoner import LatentProjector, LatentReasoner, TrmInputs, embedding_rms
from llm_trm_core.lm import LoadedLM, load_language_model
from llm_trm_core.store import Artifact, ArtifactStore, Manifest
from llm_trm_core.training.checkpoints import ParameterSubset, Stateful
from llm_trm_core.trm.artifacts import load_trm


def check_lineage(trm: Manifest, compressor: Manifest, store: ArtifactStore, latent: Manifest | None = None) -> None:
    """The TRM must have been trained on pairs made with this compressor (and the latent stage for this TRM)."""
    if latent is not None and latent.upstream.get("trm") != trm.key:
        raise UserError(
            f"the latent artifact {latent.uri} was trained for TRM {latent.upstream.get('trm')}, not {trm.key}"
        )
    pairs = store.read_manifest("pairs", trm.upstream.get("pairs", ""))
    if pairs is None or pairs.upstream.get("compressor") != compressor.key:
        raise UserError(
            f"the TRM {trm.uri} was not trained on pairs compressed by {compressor.uri}: its compressor is "
            f"{pairs.upstream.get('compressor') if pairs else 'unknown'}. "
            "Use the TRM and compressor of one pipeline run."
        )


def build_reasoner(
    cfg: PipelineConfig, store: ArtifactStore, compressor: Manifest, trm: Manifest, lm: LoadedLM | None = None
) -> LatentReasoner:
    lm = lm or load_language_model(cfg.model, cfg.runtime)
    comp = load_compressor(store, compressor)
    if comp.hidden_size != lm.info.hidden_size:
        raise UserError(
            f"the compressor {compressor.uri} maps D={comp.hidden_size} but {lm.info.name} has "
            f"D={lm.info.hidden_size}: the TRM and compressor belong to another language model"
        )
    model = load_trm(store, trm)
    projector = LatentProjector(comp.d_prime, lm.info.hidden_size, cfg.latent.num_latents, embedding_rms(lm))
    layer = resolve_layer(cfg.compressor.layer, lm.info.num_layers)
    return LatentReasoner(lm, comp, model, projector, layer, cfg.trm.n_supervision, cfg.pairs.pre_positions != "all")


def add_lora(reasoner: LatentReasoner, rank: int, alpha: int, targets: list[str]) -> list[torch.nn.Parameter]:
    """Attach LoRA adapters to the LM (transformers' peft integration); returns their parameters."""
    from peft import LoraConfig

    model: Any = reasoner.lm.model
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    try:
        model.add_adapter(config)
    except ValueError as exc:
        raise UserError(f"cannot attach LoRA to {reasoner.lm.info.name}: {exc}; check latent.lora_targets") from None
    return [p for name, p in model.named_parameters() if "lora_" in name]


def lora_names(reasoner: LatentReasoner) -> set[str]:
    """The names of the LoRA parameters attached to the reasoner's LM (what a checkpoint saves of them)."""
    return {name for name, _ in reasoner.lm.model.named_parameters() if "lora_" in name}


def trained_modules(reasoner: LatentReasoner, *, trm: bool, lora: bool) -> dict[str, Stateful]:
    """What a trainer of the latent policy updates and checkpoints, by name: the projector, the TRM when it
    trains, the LM's LoRA adapters when it has them (the latent and GRPO trainers)."""
    models: dict[str, Stateful] = {"projector": reasoner.projector}
    if trm:
        models["trm"] = reasoner.trm
    if lora:
        models["lora"] = ParameterSubset(reasoner.lm.model, lora_names(reasoner))
    return models


def _load_lora(artifact: Artifact, reasoner: LatentReasoner) -> None:
    from peft import set_peft_model_state_dict

    lora = json.loads(artifact.read_bytes("lora.json"))
    add_lora(reasoner, lora["rank"], lora["alpha"], lora["targets"])
    set_peft_model_state_dict(reasoner.lm.model, load_safetensors(artifact.read_bytes("lora.safetensors")))


def load_latent(store: ArtifactStore, manifest: Manifest, reasoner: LatentReasoner) -> LatentReasoner:
    artifact = store.open(manifest.stage, manifest.key)
    if "lora.safetensors" in artifact.manifest.files:
        _load_lora(artifact, reasoner)
    config = json.loads(artifact.read_bytes("projector.json"))
    projector = LatentProjector(config["d_prime"], config["hidden_size"], config["k"], config["embed_rms"])
    projector.load_state_dict(load_safetensors(artifact.read_bytes("projector.safetensors")))
    reasoner.projector = projector.eval()
    if "trm.safetensors" in artifact.manifest.files:
        reasoner.trm.load_state_dict(load_safetensors(artifact.read_bytes("trm.safetensors")))
    if "mean_output.safetensors" in artifact.manifest.files:
        reasoner.mean_output = load_safetensors(artifact.read_bytes("mean_output.safetensors"))["mean_output"]
    return reasoner


def load_mean_inputs(store: ArtifactStore, latent: Manifest) -> TrmInputs | None:
    """The TRM inputs of the latent stage's training questions (its mean output's), if the artifact has them."""
    artifact = store.open(latent.stage, latent.key)
    if "mean_inputs.safetensors" not in artifact.manifest.files:
        return None
    return TrmInputs.from_bytes(artifact.read_bytes("mean_inputs.safetensors"))


def load_grpo(store: ArtifactStore, manifest: Manifest, reasoner: LatentReasoner) -> LatentReasoner:
    """Overlay a GRPO artifact's weights on a reasoner already loaded with its latent artifact."""
    artifact = store.open(manifest.stage, manifest.key)
    files = artifact.manifest.files
    if "lora.safetensors" in files:
        _load_lora(artifact, reasoner)
    if "projector.safetensors" in files:
        reasoner.projector.load_state_dict(load_safetensors(artifact.read_bytes("projector.safetensors")))
    if "trm.safetensors" in files:
        reasoner.trm.load_state_dict(load_safetensors(artifact.read_bytes("trm.safetensors")))
        reasoner.mean_output = None  # the latent stage's mean output was the previous TRM's
    return reasoner
