"""Problem sources and the text corpus: deterministic, split by id, offline-safe."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from llm_trm_core.config import CorpusConfig, ProblemsConfig
from llm_trm_core.data.corpus import iter_corpus
from llm_trm_core.data.problems import PROBLEM_SCHEMA, ProblemSet, _assign_split, _build, load_problems
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
    for p in a.problems:  # the split is a function of the id alone
        assert p.split == _assign_split(p.id, cfg.test_fraction, cfg.val_fraction)
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
