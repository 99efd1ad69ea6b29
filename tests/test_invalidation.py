"""Changing one stage's config recomputes exactly that stage and the stages downstream of it."""

from __future__ import annotations

import uuid

from llm_trm_core.config import load_config
from llm_trm_core.stages.latent import run_latent
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.stages.trm import run_trm, run_upstream_pairs
from llm_trm_core.store import ArtifactStore


def _chain(cfg, store):
    pairs = run_upstream_pairs(cfg, store)
    trm = run_trm(cfg, store, pairs)
    compressor = store.read_manifest("compressor", pairs.upstream["compressor"])
    problems = run_problems(cfg, store)
    latent = run_latent(cfg, store, problems, compressor, trm)
    keys = {stage: store.list_keys(stage) for stage in ("hiddens", "datagen", "pairs", "trm", "latent")}
    return {"pairs": pairs.key, "trm": trm.key, "latent": latent.key}, keys


def test_a_trm_change_recomputes_trm_and_latent_only() -> None:
    root = f"memory://inv-{uuid.uuid4().hex[:8]}"
    base = load_config("tiny", [f"store.root={root}", "latent.epochs=1"])
    store = ArtifactStore(root)
    first, before = _chain(base, store)
    again, same = _chain(base, store)
    assert again == first and same == before  # nothing changed: nothing recomputed

    changed = load_config("tiny", [f"store.root={root}", "latent.epochs=1", "trm.lr=0.002"])
    second, after = _chain(changed, store)
    assert second["pairs"] == first["pairs"]  # upstream artifacts are reused
    assert second["trm"] != first["trm"] and second["latent"] != first["latent"]
    for stage in ("hiddens", "datagen", "pairs"):
        assert after[stage] == before[stage], stage  # no new artifact upstream of the change
    for stage in ("trm", "latent"):
        assert len(after[stage]) == len(before[stage]) + 1, stage  # exactly one new artifact downstream


def test_a_datagen_change_leaves_stage_1a_alone() -> None:
    root = f"memory://inv-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(root)
    base = load_config("tiny", [f"store.root={root}"])
    run_upstream_pairs(base, store)
    one_a = set(store.list_keys("compressor"))
    hiddens = store.list_keys("hiddens")
    run_upstream_pairs(load_config("tiny", [f"store.root={root}", "datagen.temperature=0.5"]), store)
    assert store.list_keys("hiddens") == hiddens
    new = set(store.list_keys("compressor")) - one_a
    assert len(new) == 1  # only the 1b compressor (trained on the new traces) is new
    (key,) = new
    assert store.read_manifest("compressor", key).metrics["phase"] == "1b"
