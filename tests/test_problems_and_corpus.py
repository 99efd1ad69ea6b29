"""Problem sources and the text corpus: deterministic, split by id, offline-safe."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from llm_trm_core.config import CorpusConfig, ProblemsConfig
from llm_trm_core.data.corpus import iter_corpus
from llm_trm_core.data.problems import PROBLEM_SCHEMA, ProblemSet, _assign_split, _build, load_problems
from llm_trm_core.data.splits import allocate, interleave
from llm_trm_core.errors import HubUnavailableError


def test_gsm_symbolic_is_deterministic_and_split_by_id() -> None:
    cfg = ProblemsConfig(source="gsm_symbolic", num_generated=120, seed=3)
    a, b = load_problems(cfg), load_problems(cfg)
    assert a.problems == b.problems and len(a.problems) >= 115
    other = load_problems(ProblemsConfig(source="gsm_symbolic", num_generated=120, seed=4))
    assert {p.id for p in other.problems} != {p.id for p in a.problems}
    counts = a.counts()
    assert counts["train"] > counts["test"] > 0 and counts["val"] > 0
    ids = Counter(p.id for p in a.problems)
    assert max(ids.values()) == 1
    for p in a.problems:  # the split is a function of the template (split unit) alone (tests/test_leak_free_splits.py)
        assert p.split == _assign_split(f"gsm_symbolic-unit-{p.unit}", cfg.test_fraction, cfg.val_fraction)
        assert p.question and "####" in p.answer_text
    # the same question lands in the same split whatever the pool size
    bigger = {p.id: p.split for p in load_problems(ProblemsConfig(num_generated=240, seed=3)).problems}
    assert all(bigger[p.id] == p.split for p in a.problems if p.id in bigger)


def test_problem_table_round_trip() -> None:
    ps = load_problems(ProblemsConfig(num_generated=10))
    table = ps.to_table()
    assert table.schema.equals(PROBLEM_SCHEMA, check_metadata=True)
    assert ProblemSet.from_table(table).problems == ps.problems


def test_bad_problems_are_rejected_and_counted() -> None:
    rejected: Counter[str] = Counter()
    rows = [
        ("", "#### 3", None),
        ("What is 1+1?", "no gold marker", None),
        ("What is 2+2?", "2+2=4\n#### 4", None),
        ("What is 2+2?", "#### 4", None),
        ("What is 3+3?", "", 6),
    ]
    problems = _build(rows, "t", lambda _: "train", rejected)
    assert [p.answer_value for p in problems] == [4.0, 6.0]
    assert rejected == {"empty_question": 1, "no_parseable_gold_answer": 1, "duplicate_question": 1}


def test_hub_dataset_offline_fails_at_once_naming_the_alternative() -> None:
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE is set.*problems.source=gsm_symbolic"):
        load_problems(ProblemsConfig(source="gsm8k"))
    with pytest.raises(HubUnavailableError, match="corpus.source=python-docs"):
        list(iter_corpus(CorpusConfig(source="fineweb-edu")))
    assert time.perf_counter() - start < 2.0


def test_offline_corpus_is_real_english_and_deterministic() -> None:
    cfg = CorpusConfig(source="python-docs", num_documents=60, heldout_fraction=0.3)
    docs = list(iter_corpus(cfg))
    assert docs == list(iter_corpus(cfg))
    assert len(docs) == 60 and len({d.id for d in docs}) == 60
    splits = Counter(d.split for d in docs)
    assert splits["train"] > splits["val"] > 0 and splits["test"] > 0
    words = " ".join(d.text for d in docs).lower().split()
    common = Counter(words)
    for word in ("the", "is", "of", "a", "to"):  # English function words are everywhere
        assert common[word] > 50, word
    assert sum(w.isalpha() for w in words) / len(words) > 0.6


def test_offline_corpus_reaches_the_local_preset_size() -> None:
    docs = list(iter_corpus(CorpusConfig(num_documents=400)))
    assert len(docs) == 400
    assert sum(len(d.text) for d in docs) > 300_000


@pytest.mark.parametrize(
    "sizes",
    [{"train": 6726, "val": 747, "test": 1319}, {"train": 45, "val": 6, "test": 13}, {"train": 5, "val": 0, "test": 5}],
)
def test_interleave_is_a_proportional_prefix_order(sizes: dict[str, int]) -> None:
    order = list(interleave(sizes))
    total = sum(sizes.values())
    assert sorted(order) == sorted((s, i) for s, n in sizes.items() for i in range(n))  # every item once
    assert order == list(interleave(dict(sizes)))  # a function of the sizes alone
    for split in sizes:  # each split keeps its own order
        assert [i for s, i in order if s == split] == list(range(sizes[split]))
    seen = Counter[str]()
    for n, (split, _) in enumerate(order, start=1):  # every prefix is proportional, to within one
        seen[split] += 1
        assert all(abs(seen[s] - n * sizes[s] / total) <= 1 for s in sizes), (n, seen)
        if n in (1, 10, 100, 1000):
            assert allocate(sizes, n) == {s: seen[s] for s in sizes}
    assert allocate(sizes, total + 5) == sizes


def test_gsm8k_sized_allocation() -> None:
    assert allocate({"train": 6726, "val": 747, "test": 1319}, 1000) == {"train": 765, "val": 85, "test": 150}


def test_stratified_selection_of_generated_problems_is_nested_and_per_split() -> None:
    ps = load_problems(ProblemsConfig(num_generated=64))
    small, large = ps.select_stratified(24), ps.select_stratified(40)
    assert large[:24] == small and len({p.id for p in large}) == 40
    assert {p.split for p in small} == {"train", "val", "test"}
    everything = ps.select_stratified(10_000)  # more than there are: all of them, once
    assert len(everything) == len(ps.problems) and {p.id for p in everything} == {p.id for p in ps.problems}
    assert ps.select_split("test", 5) == ps.split("test")[:5] and ps.select_split("val", 999) == ps.split("val")
