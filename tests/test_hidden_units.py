"""The corpus hidden-state pass committed unit by unit (llm_trm_core/stages/publish.py `StateUnits`): killed
after its second unit, a rerun computes only the units it had not committed, and the artifact (key and file
digests) equals an uninterrupted run's; a fanned-out part (`run_corpus_hidden_units`) computes only its own
units, which the `hiddens` stage then finds committed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llm_trm_core.config import load_config
from llm_trm_core.stages.keys import key_for
from llm_trm_core.stages.publish import unit_bounds
from llm_trm_core.store import ArtifactStore
from llm_trm_core.training.checkpoints import CheckpointManager
from tests.helpers.stage_cli import file_digests, run_stage

UNITS = "compressor.hidden_unit_sequences=64"  # the tiny corpus's 359 sequences: 6 units


def test_unit_bounds_are_whole_batches() -> None:
    assert unit_bounds(10, 4, 8) == [(0, 8), (8, 10)]
    assert unit_bounds(10, 4, 9) == [(0, 8), (8, 10)]  # rounded down to whole batches
    assert unit_bounds(5, 4, 1) == [(0, 4), (4, 5)]  # at least one batch
    assert unit_bounds(0, 4, 8) == []


def test_hidden_states_killed_mid_way_compute_only_the_units_not_committed(tmp_path: Path) -> None:
    whole = run_stage("hiddens", tmp_path / "whole")  # the default unit size (three units here): the same bytes
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_stage("hiddens", tmp_path / "killed", UNITS, fault="checkpoint:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not list((tmp_path / "killed" / "hiddens").glob("*/_MANIFEST.json"))
    resumed = run_stage("hiddens", tmp_path / "killed", UNITS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 of 6 units committed already" in resumed.stderr
    assert "unit 1 of 6 committed" not in resumed.stderr and "unit 3 of 6 committed" in resumed.stderr
    reference = file_digests(tmp_path / "whole", "hiddens")
    assert reference and file_digests(tmp_path / "killed", "hiddens") == reference  # same key, same bytes
    assert not list((tmp_path / "killed" / "hiddens").glob("*/checkpoints*"))  # cleared after the commit


def test_trace_hidden_states_killed_mid_way_compute_only_the_units_not_committed(tmp_path: Path) -> None:
    small = "compressor.hidden_unit_sequences=4"  # the tiny preset's traces in units of one batch
    whole = run_stage("trace-hiddens", tmp_path / "whole", small)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_stage("trace-hiddens", tmp_path / "killed", small, fault="trace-hiddens-checkpoint:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not list((tmp_path / "killed" / "trace-hiddens").glob("*/_MANIFEST.json"))
    resumed = run_stage("trace-hiddens", tmp_path / "killed", small)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"2 of \d+ units committed already", resumed.stderr), resumed.stderr[-3000:]
    reference = file_digests(tmp_path / "whole", "trace-hiddens")
    assert reference and file_digests(tmp_path / "killed", "trace-hiddens") == reference  # same key, same bytes
    # one unit per batch gives the bytes of the default (one unit here): the units never change the artifact
    default = run_stage("trace-hiddens", tmp_path / "default")
    assert default.returncode == 0 and file_digests(tmp_path / "default", "trace-hiddens") == reference


def test_a_fanned_out_part_computes_only_its_units(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from llm_trm_core.errors import UserError
    from llm_trm_core.stages.compressor import run_corpus_hidden_units, run_corpus_hiddens

    caplog.set_level("INFO")
    cfg = load_config("tiny", [f"store.root=file://{tmp_path}", UNITS])
    store = ArtifactStore(cfg.store.root)
    done = run_corpus_hidden_units(cfg, store, 1, 3)  # 6 units in 3 parts: part 1 is units 2 and 3
    assert done["units"] == [2, 3] and done["computed"] == [2, 3] and not done["committed"]
    assert run_corpus_hidden_units(cfg, store, 1, 3)["computed"] == []  # committed: nothing to run again
    key = key_for(cfg, "hiddens")
    assert CheckpointManager(store, "hiddens", key).complete_steps() == [3, 4]
    assert run_corpus_hidden_units(cfg, store, 7, 10)["units"] == []  # more parts than units
    with pytest.raises(UserError, match="part 3 of 3 does not exist"):
        run_corpus_hidden_units(cfg, store, 3, 3)
    caplog.clear()
    manifest = run_corpus_hiddens(cfg, store)
    assert "2 of 6 units committed already" in caplog.text
    assert run_corpus_hidden_units(cfg, store, 0, 3)["committed"]  # the artifact is there: nothing to do
    assert manifest.key == key and not CheckpointManager(store, "hiddens", key).complete_steps()
