"""Sizes that cannot work together are refused when the run starts, before any model loads: from the CLI
(exit 2, one line) and from a flow run submitted like the UI does (the run fails at once with that line)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_trm_core.config import load_config
from llm_trm_core.errors import ConfigError
from llm_trm_core.plan import check_shapes, model_hidden_size

REPO = Path(__file__).resolve().parents[1]


def test_hidden_sizes_known_before_loading(tmp_path: Path) -> None:
    assert model_hidden_size(load_config("tiny").model) == 64
    assert model_hidden_size(load_config("local").model) == 576
    assert model_hidden_size(load_config("smollm3-3b").model) == 2048  # offline: the presets' table
    (tmp_path / "config.json").write_text('{"hidden_size": 96}')
    folder = load_config("tiny", ["model.source=folder", f"model.name_or_path={tmp_path}"]).model
    assert model_hidden_size(folder) == 96
    unknown = load_config("tiny", ["model.source=hub", "model.name_or_path=someone/unknown-model"]).model
    assert model_hidden_size(unknown) is None


@pytest.mark.parametrize(
    ("overrides", "command", "fragments"),
    [
        (["compressor.d_prime=64"], "compressor", ["compressor.d_prime=64", "D=64", "model.source=tiny-random"]),
        (["compressor.d_prime=256"], "pipeline", ["compressor.d_prime=256", "below 64"]),
        (["sweep.d_primes=[64, 128]"], "sweep", ["sweep.d_primes=[64, 128]", "D=64"]),
        (
            ["compressor.d_prime=18", "trm.n_heads=4"],
            "trm",
            ["trm.n_heads=4", "compressor.d_prime=18", "[1, 2, 3, 6, 9, 18]"],
        ),
    ],
)
def test_shapes_that_cannot_work_are_named(overrides: list[str], command: str, fragments: list[str]) -> None:
    from llm_trm_core.plan import COMMAND_STAGES

    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError) as caught:
        check_shapes(cfg, COMMAND_STAGES[command])
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    assert "Fix:" in str(caught.value)


def test_every_preset_passes_and_a_sweep_skips_only_what_it_must() -> None:
    for preset in ("tiny", "local", "smollm3-3b"):
        check_shapes(load_config(preset))
    check_shapes(load_config("tiny", ["sweep.d_primes=[8, 64]"]))  # 64 is skipped, 8 remains


def test_cli_refuses_d_prime_at_the_hidden_size_in_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    command = ["pipeline", "--preset", "tiny", "--store", f"file://{tmp_path}", "compressor.d_prime=256"]
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: compressor.d_prime=256 is not below the model's hidden size D=64"), line
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "hiddens").exists()


@pytest.mark.usefixtures("prefect_server")
def test_a_submitted_run_with_impossible_sizes_fails_at_start(tmp_path: Path) -> None:
    from flows.compressor import compressor_flow

    cfg = load_config("tiny", [f"store.root=file://{tmp_path / 'store'}", "compressor.d_prime=256"])
    state = compressor_flow(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="compressor.d_prime=256 is not below"):
        state.result()
    assert not (tmp_path / "store" / "hiddens").exists()  # nothing ran
