"""The config tree: presets, dotted overrides, unknown keys, keyed dumps."""

from __future__ import annotations

import pytest

from llm_trm_core.config import (
    PRESETS,
    PipelineConfig,
    apply_overrides,
    keyed_dump,
    load_config,
    parse_config,
    preset_data,
)
from llm_trm_core.errors import ConfigError


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses_and_round_trips(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.preset == preset
    # the same object is the flow parameter: a JSON round trip gives an equal config
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_presets_differ_where_they_should() -> None:
    tiny, local, big = (load_config(p) for p in PRESETS)
    assert tiny.model.source == "tiny-random"
    assert local.model.source == "smollm2-gguf" and local.problems.source == "gsm_symbolic"
    assert big.model.name_or_path == "HuggingFaceTB/SmolLM3-3B" and big.problems.source == "gsm8k"
    assert big.corpus.source == "fineweb-edu" and big.model.thinking == "native"


def test_dotted_overrides_parse_values_as_yaml() -> None:
    cfg = load_config(
        "tiny",
        ["compressor.d_prime=32", "compressor.centered=true", "sweep.d_primes=[4, 8]", "model.tiny.seed=7"],
    )
    assert cfg.compressor.d_prime == 32 and cfg.compressor.centered is True
    assert cfg.sweep.d_primes == [4, 8] and cfg.model.tiny.seed == 7
    assert load_config("tiny", ["store.root=gs://bucket/prefix"]).store.root == "gs://bucket/prefix"


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["compressor.d_primee=3"])
    message = str(info.value)
    assert "compressor.d_primee" in message
    assert "d_prime" in message and "centered" in message  # the allowed keys are listed
    with pytest.raises(ConfigError, match="unknown key 'nope'; allowed keys in the top level: preset, model"):
        load_config("tiny", ["nope=1"])
    with pytest.raises(ConfigError, match="unknown key 'model.tiny.width'"):
        parse_config({"model": {"tiny": {"width": 3}}})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("compressor.d_prime=abc", "compressor.d_prime"),
        ("compressor.d_prime=0", "greater than or equal to 1"),
        ("compressor", "key=value"),
        ("compressor.d_prime.x=1", "is a value, not a section"),
        ("model.source=hub", "needs model.name_or_path"),
        ("problems.val_fraction=0.85", "must be < 1"),
        ("runtime..seed=1", "empty key"),
        ("model.source=[unclosed", "not valid YAML"),
    ],
)
def test_bad_overrides_give_clear_errors(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("[", r"\[")):
        load_config("tiny", [override])


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="choose one of: tiny, local, smollm3-3b"):
        preset_data("huge")


def test_overrides_do_not_mutate_the_input() -> None:
    data = preset_data("tiny")
    apply_overrides(data, ["compressor.d_prime=99"])
    assert data["compressor"]["d_prime"] == 16


def test_keyed_dump_drops_fields_that_do_not_affect_outputs() -> None:
    cfg = load_config("tiny")
    dumped = keyed_dump(cfg.compressor)
    assert "extract_batch_size" not in dumped and "checkpoint_every" not in dumped and "d_prime" in dumped
    assert "batch_size" in keyed_dump(cfg.datagen)  # batch composition changes seeded samples: it is keyed
    assert "device" not in keyed_dump(cfg.runtime) and "seed" in keyed_dump(cfg.runtime)
    assert keyed_dump(cfg.model)["tiny"]["hidden_size"] == 64
    assert keyed_dump(load_config("tiny", ["compressor.extract_batch_size=2"]).compressor) == dumped


def test_partial_mappings_start_from_their_preset() -> None:
    partial = PipelineConfig.model_validate({"preset": "local", "compressor": {"d_prime": 128}})
    assert partial == load_config("local", ["compressor.d_prime=128"])
    assert partial.model.source == "smollm2-gguf"
    assert PipelineConfig() == load_config("local") == load_config()  # one default preset: local
    with pytest.raises(ConfigError, match="preset"):
        parse_config({"preset": "huge"})
