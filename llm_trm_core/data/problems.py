"""GSM8K-format problems: `{id, split, question, answer_text, answer_value}`.

- `gsm8k`: `openai/gsm8k` (main) from the hub: its test split stays test; its train split is cut
  into train / val by problem id.
- `gsm_symbolic`: GSM8K-style problems generated offline by reasoning-gym, deterministic by seed;
  cut into train / val / test by problem id.
- `arithmetic`: reasoning-gym `basic_arithmetic` expressions (terms x digits set the difficulty), the
  same way: an easier curriculum where a small LM earns rewards often enough for GRPO.
Ids are content hashes of the question, so duplicates collapse and a question never sits in two splits.
Problems with an empty question or no parseable gold answer are rejected and counted, never used.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa

from llm_trm_core.config import ProblemsConfig
from llm_trm_core.data.answers import parse_gold
from llm_trm_core.data.splits import content_id, unit_hash
from llm_trm_core.hub import require_hub

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")

PROBLEM_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer_text", pa.string(), nullable=False),
        pa.field("answer_value", pa.float64(), nullable=False),
    ],
    metadata={"schema": "llm-trm/problems", "schema_version": "1"},
)


@dataclass(frozen=True)
class Problem:
    id: str
    split: Split
    question: str
    answer_text: str
    answer_value: float


@dataclass
class ProblemSet:
    problems: list[Problem]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count

    def split(self, name: Split) -> list[Problem]:
        return [p for p in self.problems if p.split == name]

    def counts(self) -> dict[str, int]:
        counter = Counter(p.split for p in self.problems)
        return {s: counter.get(s, 0) for s in SPLITS}

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(p) for p in self.problems], schema=PROBLEM_SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table) -> ProblemSet:
        return cls([Problem(**row) for row in table.to_pylist()])


def _assign_split(id_: str, test_fraction: float, val_fraction: float) -> Split:
    u = unit_hash(id_)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _build(rows: Iterable[tuple[str, str, Any]], prefix: str, split_of: Any, rejected: Counter[str]) -> list[Problem]:
    """rows: (question, answer_text, answer_value or None); split_of(id) -> split."""
    seen: set[str] = set()
    out: list[Problem] = []
    for question, answer_text, value in rows:
        question = (question or "").strip()
        if not question:
            rejected["empty_question"] += 1
            continue
        gold = float(value) if value is not None else parse_gold(answer_text or "")
        if gold is None:
            rejected["no_parseable_gold_answer"] += 1
            continue
        id_ = content_id(prefix, question)
        if id_ in seen:
            rejected["duplicate_question"] += 1
            continue
        seen.add(id_)
        out.append(Problem(id_, split_of(id_), question, answer_text or "", gold))
    return out


def load_problems(cfg: ProblemsConfig) -> ProblemSet:
    rejected: Counter[str] = Counter()
    if cfg.source in ("gsm_symbolic", "arithmetic"):
        rows = (
            _gsm_symbolic_rows(cfg.num_generated, cfg.seed)
            if cfg.source == "gsm_symbolic"
            else _arithmetic_rows(cfg.num_generated, cfg.seed, cfg.arithmetic_terms, cfg.arithmetic_digits)
        )
        problems = _build(
            rows,
            cfg.source,
            lambda id_: _assign_split(id_, cfg.test_fraction, cfg.val_fraction),
            rejected,
        )
    else:
        require_hub(f"problems.source=gsm8k ({cfg.hub_id})", "set problems.source=gsm_symbolic (reasoning-gym)")
        from datasets import load_dataset

        ds = load_dataset(cfg.hub_id, cfg.hub_config)
        problems = _build(
            ((r["question"], r["answer"], None) for r in ds["train"]),
            "gsm8k",
            lambda id_: _assign_split(id_, 0.0, cfg.val_fraction),
            rejected,
        )
        problems += _build(
            ((r["question"], r["answer"], None) for r in ds["test"]), "gsm8k", lambda _: "test", rejected
        )
    if rejected:
        logger.warning("rejected problems: %s", dict(rejected))
    return ProblemSet(problems, dict(rejected))


def _reasoning_gym(name: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # a reasoning-gym dependency emits SyntaxWarnings on first import
        warnings.simplefilter("ignore", SyntaxWarning)
        import reasoning_gym

    return reasoning_gym.create_dataset(name, **kwargs)


def _arithmetic_rows(size: int, seed: int, terms: int, digits: int) -> Iterable[tuple[str, str, Any]]:
    dataset = _reasoning_gym(
        "basic_arithmetic", size=size, seed=seed, min_terms=terms, max_terms=terms, min_digits=1, max_digits=digits
    )
    for item in dataset:
        answer = str(item.get("answer", ""))
        yield item.get("question", ""), f"#### {answer}", parse_gold(f"#### {answer}")


def _gsm_symbolic_rows(size: int, seed: int) -> Iterable[tuple[str, str, Any]]:
    dataset = _reasoning_gym("gsm_symbolic", size=size, seed=seed)
    for item in dataset:
        meta = item.get("metadata", {})
        yield (
            item.get("question", ""),
            meta.get("answer_cot") or f"#### {item.get('answer', '')}",
            meta.get("answer_value"),
        )
