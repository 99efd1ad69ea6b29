"""The flagship rehearsal (llm_trm_core/rehearsal.py, `llm-trm rehearse`): what it changes in the smollm3-3b
preset, and (slow) the whole run through the real CLI and the pipeline flow on the full-width stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llm_trm_core.config import load_config
from llm_trm_core.rehearsal import (
    REHEARSAL_OVERRIDES,
    RehearsalAssets,
    RssSampler,
    rehearsal_config,
    rows_per_split,
)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = RehearsalAssets(Path("/r/model"), Path("/r/gsm.parquet"), Path("/r/corpus.txt"))


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_rehearsal_is_the_preset_except_its_listed_overrides() -> None:
    preset = _leaves(load_config("smollm3-3b").model_dump(mode="json"))
    rehearsal = _leaves(rehearsal_config(ASSETS, "memory://r").model_dump(mode="json"))
    changed = {k for k in preset if preset[k] != rehearsal[k]}
    listed = set(_leaves(REHEARSAL_OVERRIDES)) | {"model.name_or_path", "problems.path", "corpus.path", "store.root"}
    assert changed <= listed, changed - listed
    assert rehearsal["model.dtype"] == "float32" and rehearsal["runtime.device"] == "cpu"
    assert rehearsal["preset"] == "smollm3-3b" and rehearsal["model.source"] == "folder"
    # the throughput settings under test stay the preset's
    for field in ("compressor.cache_dtype", "compressor.d_prime", "datagen.temperature", "grpo.lr"):
        assert rehearsal[field] == preset[field]


def test_rows_per_split_reads_nested_and_flat_reports() -> None:
    assert rows_per_split("pairs", {"pairs_train": 5, "pairs_val": 1, "pairs_test": 2}) == {
        "train": 5, "val": 1, "test": 2,
    }  # fmt: skip
    assert rows_per_split("trm", {"pairs": {"train": 7, "val": 2, "test": 3}, "d": 1}) == {
        "train": 7, "val": 2, "test": 3,
    }  # fmt: skip
    assert rows_per_split("x", {"n": 3}) == {"train": None, "val": None, "test": None}
    assert rows_per_split("latent", {"train_problems": 8, "val_problems": 4}) == {"train": 8, "val": 4, "test": None}
    assert rows_per_split("grpo", {"train_problems": 43, "heldout_problems": 4}) == {
        "train": 43, "val": None, "test": 4,
    }  # fmt: skip
    assert rows_per_split("evaluate", {"arms": {"think": {"n": 6}, "no_think": {"n": 6}}})["test"] == 6
    assert rows_per_split("compressor", {"test": {"tokens": 96.0, "fvu": 0.5}})["test"] is None  # not a count


def test_rss_sampler_sees_an_allocation() -> None:
    import time

    with RssSampler(interval=0.005) as sampler:
        time.sleep(0.05)
        start = time.time()
        block = bytearray(200 << 20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.05)
        end = time.time()
        del block
    assert sampler.peak_between(start, end) - sampler.samples[0][1] > 150 << 20


@pytest.mark.slow
@pytest.mark.timeout(3900)
def test_rehearsal_end_to_end(tmp_path: Path) -> None:
    """`llm-trm rehearse`: every stage commits, and the reports carry the splits they should."""
    workdir = Path(os.environ.get("LLM_TRM_REHEARSAL_DIR", tmp_path / "rehearsal"))
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "rehearse", "--workdir", str(workdir),
         "--store", f"file://{tmp_path / 'store'}", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=3600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-6000:])  # the per-stage table (pytest -s shows it)
    assert "peak RSS" in result.stdout
    table = {row["stage"]: row for row in json.loads(out.read_text())["rows"]}
    expected = ["problems", "hiddens", "basis", "compressor", "datagen-shard", "datagen-report", "trace-hiddens",
                "pairs", "trm", "latent", "evaluate-before-grpo", "grpo", "evaluate-after-grpo"]  # fmt: skip
    assert list(table) == expected
    for row in table.values():
        # a stage the flow asks for twice with the same inputs (problems) is Cached the second time
        assert "Completed" in row["states"] and set(row["states"]) <= {"Completed", "Cached"}, row
        assert row["peak_rss_mib"] > 0 and row["seconds"] > 0
    assert table["datagen-shard"]["runs"] == 3
    for stage in ("problems", "hiddens", "datagen-report", "trace-hiddens", "pairs", "trm"):
        assert all(table[stage][f"rows_{s}"] for s in ("train", "val", "test")), table[stage]
    assert table["latent"]["rows_train"] and table["latent"]["rows_val"], table["latent"]
    assert table["grpo"]["rows_train"] and table["grpo"]["rows_test"], table["grpo"]
    for stage in ("evaluate-before-grpo", "evaluate-after-grpo"):
        assert table[stage]["rows_test"] == REHEARSAL_OVERRIDES["evaluate"]["num_problems"], table[stage]
    # the LM at full width is in memory during the LM stages
    assert table["hiddens"]["peak_rss_mib"] > 1500


def test_stand_in_problem_file_lists_train_first_and_still_yields_every_split(tmp_path: Path) -> None:
    """The D1 case: a GSM8K-shaped file with every train row before the test rows gives train, val and
    test problems (val carved from train), each answer parsed from its `#### N` line."""
    import pyarrow.parquet as pq

    from llm_trm_core.config import ProblemsConfig
    from llm_trm_core.data.problems import load_problems
    from llm_trm_core.rehearsal import write_problem_file

    path = tmp_path / "gsm.parquet"
    write_problem_file(path, train=20, test=6)
    table = pq.read_table(path).to_pydict()
    assert table["split"] == ["train"] * 20 + ["test"] * 6
    assert all("####" in a for a in table["answer"])
    problems = load_problems(ProblemsConfig(source="file", path=str(path), val_fraction=0.25))
    by_split = {s: [p for p in problems.problems if p.split == s] for s in ("train", "val", "test")}
    sizes = {k: len(v) for k, v in by_split.items()}
    assert sizes["test"] == 6 and sizes["val"] and sizes["train"], sizes
    assert all(isinstance(p.answer_value, float) for p in problems.problems)


def test_a_workdir_that_cannot_be_created_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "rehearse", "--workdir", str(blocker / "sub")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "choose a writable folder" in result.stderr
