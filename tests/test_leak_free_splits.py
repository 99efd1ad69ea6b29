"""Leak-free splits: generated problems are split by template (gsm_symbolic) or operand set (arithmetic),
and GSM8K train is deduplicated against test."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict

import pyarrow as pa

from llm_trm_core.config import load_config
from llm_trm_core.data.problems import (
    PROBLEM_SCHEMA,
    ProblemSet,
    _reasoning_gym,
    gsm8k_problems,
    load_problems,
    split_unit,
)
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.store import ArtifactStore


def _splits_per_unit(problem_set: ProblemSet) -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for p in problem_set.problems:
        units[p.unit].add(p.split)
    return units


def test_gsm_symbolic_no_template_in_two_splits() -> None:
    cfg = load_config("tiny", ["problems.num_generated=400"]).problems
    problem_set = load_problems(cfg, quiet=True)
    units = _splits_per_unit(problem_set)
    assert "" not in units and len(units) > 20  # every problem has its template
    assert all(len(splits) == 1 for splits in units.values())  # no template in two splits
    assert {s for splits in units.values() for s in splits} == {"train", "val", "test"}
    # the unit is reasoning-gym's generator index of that very problem
    dataset = _reasoning_gym("gsm_symbolic", size=400, seed=cfg.seed)
    by_question = {item["question"]: dataset.task_indices[i] for i, item in enumerate(dataset)}
    assert all(p.unit == f"template-{by_question[p.question]}" for p in problem_set.problems)
    assert split_unit(cfg).startswith("template")


def test_arithmetic_no_operand_set_in_two_splits() -> None:
    cfg = load_config("tiny", ["problems.source=arithmetic", "problems.num_generated=300"]).problems
    problem_set = load_problems(cfg, quiet=True)
    units = _splits_per_unit(problem_set)
    assert all(len(splits) == 1 for splits in units.values())
    same = [p for p in problem_set.problems if p.unit == problem_set.problems[0].unit]
    assert all(sorted(p.unit.split(",")) == sorted(same[0].unit.split(",")) for p in same)
    assert "operand set" in split_unit(cfg)


def test_gsm8k_train_is_deduplicated_against_test() -> None:
    rejected: Counter[str] = Counter()
    train = [("What is 2 + 2?", "#### 4"), ("How  many APPLES are left?", "#### 3"), ("Other one?", "#### 1")]
    test = [("how many apples are left?", "#### 3")]
    problems = gsm8k_problems(train, test, 0.0, rejected)
    questions = {p.question: p.split for p in problems}
    assert questions == {"What is 2 + 2?": "train", "Other one?": "train", "how many apples are left?": "test"}
    assert rejected["duplicate_of_test"] == 1


def test_units_are_stored_and_old_tables_still_read() -> None:
    cfg = load_config("tiny", [f"store.root=memory://splits-{uuid.uuid4().hex[:8]}"])
    store = ArtifactStore(cfg.store.root)
    manifest = run_problems(cfg, store)
    assert manifest.metrics["split_unit"].startswith("template") and manifest.metrics["split_units"] > 5
    from llm_trm_core.data.problems import read_problems

    assert all(p.unit.startswith("template-") for p in read_problems(store, manifest).problems)
    old_schema = pa.schema([f for f in PROBLEM_SCHEMA if f.name != "unit"])
    old = pa.Table.from_pylist(
        [{"id": "a", "split": "train", "question": "q", "answer_text": "#### 1", "answer_value": 1.0}],
        schema=old_schema,
    )
    assert ProblemSet.from_table(old).problems[0].unit == ""
