"""Chaos: the real `llm-trm pipeline --preset tiny` SIGKILLed (whole process group) at seeded random points in
its stages, re-run, and compared file by file with an uninterrupted run (driver: tests/helpers/chaos.py).

After every kill: committed artifacts open with every file's sha256 verified and equal the uninterrupted
run's; folders without a manifest are refused by the store; no temporary file is listed. After the final
re-run: the same committed artifacts as the uninterrupted run, every listed file byte-identical, manifests
equal apart from timestamps, location and the digest over them. The default suite kills a few seeded
points in the short stages of `llm-trm pairs`; `-m slow` kills the whole pipeline inside every one of its 18
tasks, on file:// and on gs:// (GCS emulator).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import GCS_BUCKET
from tests.helpers.chaos import (
    Kill,
    Reference,
    chaos,
    compare_with_reference,
    make_reference,
    pipeline_env,
    reaim_missed,
)


@pytest.fixture(scope="module")
def pairs_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted `llm-trm pairs --preset tiny` run (file://): tasks 0-11, every short stage."""
    base = tmp_path_factory.mktemp("chaos-pairs-reference")
    return make_reference(f"file://{base / 'store'}", pipeline_env(base / "prefect-home"), "pairs")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted `llm-trm pipeline --preset tiny` run (file://), shared by the slow tests."""
    base = tmp_path_factory.mktemp("chaos-reference")
    return make_reference(f"file://{base / 'store'}", pipeline_env(base / "prefect-home"))


def _report(name: str, ref: Reference, kills: list[Kill], wall: float) -> str:
    rows = [
        f"  aimed {ref.tasks[k.target]:<16} +{k.delay_s:6.3f}s"
        f" -> hit {ref.tasks[k.hit] if k.hit is not None else '-':<16}"
        f"{' before commit' if k.before_commit else ' after commit ' if k.hit is not None else ''}"
        f" tmp={k.temporaries} uncommitted={k.uncommitted}"
        for k in kills
    ]
    return f"{name}: {len(kills)} kills, {wall:.0f} s\n" + "\n".join(rows)


def _run(root: str, tmp_path: Path, ref: Reference, *, seed: int, targets: list[int] | None) -> list[Kill]:
    """The chaos loop in `root`, then targets it missed re-aimed in fresh roots seeded from the reference;
    every root ends byte-identical to the reference run. Returns every kill."""
    t0 = time.monotonic()
    env = pipeline_env(tmp_path / "prefect-home")
    kills = chaos(root, env, ref, seed=seed, targets=targets)
    compare_with_reference(root, ref)
    print(_report(f"chaos {root} seed={seed}", ref, kills, time.monotonic() - t0))
    for fresh, more in reaim_missed(root, env, ref, kills, seed=seed, targets=targets):
        compare_with_reference(fresh, ref)
        print(_report(f"re-aimed in {fresh}", ref, more, time.monotonic() - t0))
        kills += more
    # a kill that lands after the last task hits nothing; its target is re-aimed above, and the callers
    # check that every target was hit
    return kills


# the short stages: basis, the datagen report, trace-hiddens, pairs
DEFAULT_TARGETS = ("basis", "datagen", "trace-hiddens", "pairs")


@pytest.mark.slow  # about 4 minutes alone on 2 cores: it keeps the default suite near its 15-minute budget
@pytest.mark.timeout(1200)
def test_sigkill_in_the_short_stages_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, pairs_reference: Reference
) -> None:
    """Default suite (~3 min): `llm-trm pairs` killed at seeded points in basis, the datagen report,
    trace-hiddens and pairs (a kill that lands later than aimed hits a later task)."""
    targets = [pairs_reference.tasks.index(name) for name in DEFAULT_TARGETS]
    kills = _run(f"file://{tmp_path / 'store'}", tmp_path, pairs_reference, seed=13, targets=targets)
    assert {k.hit for k in kills} >= set(targets), kills


def _every_task_hit(ref: Reference, kills: list[Kill]) -> None:
    hit = {k.hit for k in kills}
    missed = [name for i, name in enumerate(ref.tasks) if i not in hit]
    assert not missed, f"no kill landed in {missed}"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_in_every_stage_file_store(tmp_path: Path, reference: Reference) -> None:
    kills = _run(f"file://{tmp_path / 'store'}", tmp_path, reference, seed=2026, targets=None)
    _every_task_hit(reference, kills)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_in_every_stage_gcs_emulator(tmp_path: Path, reference: Reference, gcs_emulator: str) -> None:
    """On gs:// the files must equal the file:// reference run's byte for byte (keys and contents do not
    depend on where the store is)."""
    root = f"gs://{GCS_BUCKET}/chaos-{uuid.uuid4().hex[:8]}"
    kills = _run(root, tmp_path, reference, seed=7, targets=None)
    _every_task_hit(reference, kills)
