"""GSM8K-format problems: `{id, split, question, answer_text, answer_value}`.

- `gsm8k`: `openai/gsm8k` (main) from the hub: its test split stays test; its train split is cut
  into train / val by problem id.
- `gsm_symbolic`: GSM8K-style problems generated offline by reasoning-gym, deterministic by seed; cut
  into train / val / test by TEMPLATE (reasoning-gym's generator index, about 100 of them), so problems
  of one template, which differ only in names and numbers, never sit in two splits.
- `arithmetic`: reasoning-gym `basic_arithmetic` expressions (terms x digits set the difficulty), cut by
  OPERAND SET (the sorted magnitudes of the numbers), so `3 + 5` and `5 - 3` share a split: an easier
  curriculum where a small LM earns rewards often enough for GRPO.
- `file`: your own Parquet or JSON Lines file(s) at `problems.path` (a file, a folder or a glob, local or
  any fsspec URL such as `gs://`), with columns `question` and `answer` (GSM8K's text ending in a
  `#### N` line, or a number) and optionally `split` (`train` / `val` / `test`; `validation` and `dev`
  mean val). With a split column, its test rows are the test split and, when no row says val, a
  `problems.val_fraction` share of the train rows is held out by id, as for GSM8K; without one, rows are
  cut by id like the generated sources.
Ids are content hashes of the question, so duplicates collapse and a question never sits in two splits;
GSM8K train questions that repeat a test question (after lower-casing and collapsing whitespace) are
dropped (`rejected_duplicate_of_test`). `split_unit(cfg)` names the unit a source is split by
(docs/evaluation.md).
Problems with an empty question, no parseable gold answer or an empty split value are rejected and
counted, never used; a file that cannot be used at all is a `ConfigError` naming the file and the fix.

Which problems a stage takes is a count per split (`select_split`), or for datagen a stratified prefix
(`select_stratified`): the splits interleaved in proportion to their sizes, each in problem-set order.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa

from llm_trm_core import arrow
from llm_trm_core.config import ProblemsConfig
from llm_trm_core.data.answers import parse_gold
from llm_trm_core.data.files import DataFiles, iter_jsonl, kind_of, list_files, parquet_columns, read_parquet
from llm_trm_core.data.splits import content_id, interleave, unit_hash
from llm_trm_core.errors import ConfigError
from llm_trm_core.hub import require_hub
from llm_trm_core.store import ArtifactStore, Manifest

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
        pa.field("unit", pa.string(), nullable=False),
    ],
    metadata={"schema": "llm-trm/problems", "schema_version": "2"},
)


@dataclass(frozen=True)
class Problem:
    id: str
    split: Split
    question: str
    answer_text: str
    answer_value: float
    unit: str = ""  # the split unit this problem belongs to (template, operand set) or "" (the problem itself)


@dataclass
class ProblemSet:
    problems: list[Problem]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count

    def split(self, name: Split) -> list[Problem]:
        return [p for p in self.problems if p.split == name]

    def select_split(self, name: Split, n: int) -> list[Problem]:
        """The first `n` problems of one split, in problem-set order (all of them when it has fewer)."""
        return self.split(name)[:n]

    def select_stratified(self, n: int) -> list[Problem]:
        """The first `n` of the splits interleaved in proportion to their sizes (see `splits.interleave`):
        each split gets its share of `n` (to within one), and a larger `n` extends a smaller one."""
        by_split: dict[str, list[Problem]] = {name: self.split(name) for name in SPLITS}
        order = interleave({name: len(items) for name, items in by_split.items()})
        return [by_split[name][i] for name, i in itertools.islice(order, n)]

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


SPLIT_UNITS = {
    "gsm_symbolic": "template (reasoning-gym generator index)",
    "arithmetic": "operand set (sorted magnitudes of the expression's numbers)",
    "gsm8k": "problem (train deduplicated against test)",
    "file": "problem",
}


def split_unit(cfg: ProblemsConfig) -> str:
    """What a source's splits are cut by: no unit has problems in two splits."""
    return SPLIT_UNITS[cfg.source]


def _normalized(question: str) -> str:
    return " ".join(question.lower().split())


def _build(
    rows: Iterable[tuple[Any, ...]],
    prefix: str,
    split_of: Any,
    rejected: Counter[str],
    exclude: set[str] | None = None,
) -> list[Problem]:
    """rows: (question, answer_text, answer_value or None[, unit]); split_of(id) -> split. With a unit, the
    split is drawn from the unit's id, so every problem of a unit lands in the same split. `exclude`:
    normalized questions to drop (counted as duplicate_of_test)."""
    seen: set[str] = set()
    out: list[Problem] = []
    for question, answer_text, value, *rest in rows:
        unit = str(rest[0]) if rest and rest[0] is not None else ""
        question = (question or "").strip()
        if not question:
            rejected["empty_question"] += 1
            continue
        gold = float(value) if value is not None else parse_gold(answer_text or "")
        if gold is None:
            rejected["no_parseable_gold_answer"] += 1
            continue
        if exclude is not None and _normalized(question) in exclude:
            rejected["duplicate_of_test"] += 1
            continue
        id_ = content_id(prefix, question)
        if id_ in seen:
            rejected["duplicate_question"] += 1
            continue
        seen.add(id_)
        split = split_of(f"{prefix}-unit-{unit}") if unit else split_of(id_)
        out.append(Problem(id_, split, question, answer_text or "", gold, unit))
    return out


def load_problems(cfg: ProblemsConfig, quiet: bool = False) -> ProblemSet:
    """The problem set; rejected rows are counted (and logged as a warning unless `quiet`)."""
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
    elif cfg.source == "file":
        problems = _file_problems(cfg, rejected)
    else:
        require_hub(f"problems.source=gsm8k ({cfg.hub_id})", "set problems.source=gsm_symbolic (reasoning-gym)")
        from datasets import load_dataset

        ds = load_dataset(cfg.hub_id, cfg.hub_config)
        problems = gsm8k_problems(
            ((r["question"], r["answer"]) for r in ds["train"]),
            ((r["question"], r["answer"]) for r in ds["test"]),
            cfg.val_fraction,
            rejected,
        )
    if rejected:
        logger.log(logging.DEBUG if quiet else logging.WARNING, "rejected problems: %s", dict(rejected))
    return ProblemSet(problems, dict(rejected))


def gsm8k_problems(
    train: Iterable[tuple[str, str]], test: Iterable[tuple[str, str]], val_fraction: float, rejected: Counter[str]
) -> list[Problem]:
    """GSM8K's official test split, then its train split cut into train / val by id, without any train
    question that repeats a test one (lower-cased, whitespace collapsed)."""
    test_problems = _build(((q, a, None) for q, a in test), "gsm8k", lambda _: "test", rejected)
    seen_test = {_normalized(p.question) for p in test_problems}
    train_problems = _build(
        ((q, a, None) for q, a in train),
        "gsm8k",
        lambda id_: _assign_split(id_, 0.0, val_fraction),
        rejected,
        exclude=seen_test,
    )
    return train_problems + test_problems


# Rows per split of hub datasets whose sizes are known without downloading them: (train, test).
HUB_SPLIT_ROWS: dict[tuple[str, str], tuple[int, int]] = {
    ("openai/gsm8k", "main"): (7473, 1319),
    ("openai/gsm8k", "socratic"): (7473, 1319),
}


def split_sizes(cfg: ProblemsConfig) -> dict[str, int] | None:
    """Problems per split without loading a model: exact for the generated sources and files (they are read,
    which takes well under a second for GSM8K-sized sets), estimated for known hub datasets (official
    sizes, val = `val_fraction` of train), None for other hub datasets."""
    if cfg.source == "gsm8k":
        rows = HUB_SPLIT_ROWS.get((cfg.hub_id, cfg.hub_config))
        if rows is None:
            return None
        train, test = rows
        val = round(train * cfg.val_fraction)
        return {"train": train - val, "val": val, "test": test}
    return load_problems(cfg, quiet=True).counts()


# ---------------------------------------------------------------------------------------------
# problems.source=file

SPLIT_NAMES: dict[str, Split] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test",
}  # fmt: skip
COLUMNS_HELP = (
    "columns 'question' and 'answer' (GSM8K style: the answer's last line is '#### N', or a number), "
    "optionally 'split' (train/val/test)"
)


def _answer(value: Any) -> tuple[str, float | None]:
    """(answer_text, value) of an answer cell: GSM8K text (value parsed later) or a finite number."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        number = float(value)
        return f"#### {int(number) if number.is_integer() else number}", number
    return "", None


def _file_rows(files: DataFiles, path: str) -> tuple[list[dict[str, Any]], bool]:
    """The rows of one problem file (question, answer, split) and whether it has a split column."""
    if kind_of(path) == "parquet":
        names = parquet_columns(files, path)
        missing = [c for c in ("question", "answer") if c not in names]
        if missing:
            raise ConfigError(
                f"{files.name(path)} has no {' or '.join(repr(c) for c in missing)} column (it has: "
                f"{', '.join(names) or 'none'}); problem files need {COLUMNS_HELP}"
            )
        wanted = [c for c in ("question", "answer", "split") if c in names]
        return read_parquet(files, path, wanted), "split" in names
    rows = list(iter_jsonl(files, path))
    keys = set().union(*(row.keys() for row in rows)) if rows else set()
    missing = [c for c in ("question", "answer") if c not in keys]
    if missing:
        raise ConfigError(
            f"{files.name(path)} has no {' or '.join(repr(c) for c in missing)} field in any line "
            f"(fields: {', '.join(sorted(keys)) or 'none'}); problem files need {COLUMNS_HELP}"
        )
    return rows, "split" in keys


def _file_problems(cfg: ProblemsConfig, rejected: Counter[str]) -> list[Problem]:
    files = list_files(cfg.path, "problems.path", ("parquet", "jsonl"))
    rows: list[tuple[str, str, float | None]] = []
    labels: dict[str, Split] = {}  # id -> the split its first row names
    with_split: list[str] = []
    for path in files.paths:
        file_rows, has_split = _file_rows(files, path)
        if has_split:
            with_split.append(path)
        for row in file_rows:
            question = row.get("question")
            question = "" if question is None else str(question)
            answer_text, value = _answer(row.get("answer"))
            if has_split:
                raw = row.get("split")
                label = str(raw).strip().lower() if raw is not None else ""
                if not label:
                    rejected["no_split"] += 1
                    continue
                if label not in SPLIT_NAMES:
                    raise ConfigError(
                        f"{files.name(path)}: split value {raw!r} is not one of {', '.join(SPLIT_NAMES)}; "
                        "fix the split column or drop it to split by problems.test_fraction / problems.val_fraction"
                    )
                labels.setdefault(content_id("file", question.strip()), SPLIT_NAMES[label])
            rows.append((question, answer_text, value))
    if with_split and len(with_split) != len(files.paths):
        without = next(p for p in files.paths if p not in with_split)
        raise ConfigError(
            f"{files.name(without)} has no split column but {files.name(with_split[0])} has one; "
            "give every problem file a split column, or none"
        )
    if with_split:
        has_val = "val" in labels.values()

        def split_of(id_: str) -> Split:
            label = labels[id_]
            return _assign_split(id_, 0.0, cfg.val_fraction) if label == "train" and not has_val else label

    else:

        def split_of(id_: str) -> Split:
            return _assign_split(id_, cfg.test_fraction, cfg.val_fraction)

    problems = _build(rows, "file", split_of, rejected)
    where = f"problems.path={cfg.path!r}" + (f" ({len(files.paths)} files)" if len(files.paths) > 1 else "")
    if not problems:
        raise ConfigError(
            f"{where}: none of its {sum(rejected.values())} rows is usable (rejected: {dict(rejected)}); "
            f"problem files need {COLUMNS_HELP}, with a non-empty question on every row"
        )
    if with_split:
        present = {p.split for p in problems}
        for split, fix in (
            ("train", "add rows with split=train"),
            ("test", "add rows with split=test"),
        ):
            if split not in present:
                raise ConfigError(
                    f"{where}: no usable {split} rows in the split column; {fix}, or drop the split column to "
                    "cut the problems by problems.test_fraction / problems.val_fraction"
                )
    return problems


def _reasoning_gym(name: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # a reasoning-gym dependency emits SyntaxWarnings on first import
        warnings.simplefilter("ignore", SyntaxWarning)
        import reasoning_gym

    return reasoning_gym.create_dataset(name, **kwargs)


def _arithmetic_rows(size: int, seed: int, terms: int, digits: int) -> Iterable[tuple[Any, ...]]:
    dataset = _reasoning_gym(
        "basic_arithmetic", size=size, seed=seed, min_terms=terms, max_terms=terms, min_digits=1, max_digits=digits
    )
    for item in dataset:
        answer = str(item.get("answer", ""))
        yield item.get("question", ""), f"#### {answer}", parse_gold(f"#### {answer}"), _operand_set(item)


def _operand_set(item: dict[str, Any]) -> str:
    """The split unit of an arithmetic expression: the sorted magnitudes of its numbers."""
    expression = str(item.get("metadata", {}).get("expression", item.get("question", "")))
    return ",".join(sorted(re.findall(r"\d+(?:\.\d+)?", expression), key=lambda x: (float(x), x)))


def _gsm_symbolic_rows(size: int, seed: int) -> Iterable[tuple[Any, ...]]:
    dataset = _reasoning_gym("gsm_symbolic", size=size, seed=seed)
    templates = getattr(dataset, "task_indices", None)  # the generator (template) of each index
    for index, item in enumerate(dataset):
        meta = item.get("metadata", {})
        source_index = int(meta.get("source_index", index))
        yield (
            item.get("question", ""),
            meta.get("answer_cot") or f"#### {item.get('answer', '')}",
            meta.get("answer_value"),
            f"template-{templates[source_index]}" if templates is not None else None,
        )


PROBLEMS_STAGE = "problems"
PROBLEMS_FILE = "problems.parquet"


def read_problems(store: ArtifactStore, manifest: Manifest) -> ProblemSet:
    """The problem set of a committed `problems` artifact."""
    return ProblemSet.from_table(arrow.read_parquet(store.open(PROBLEMS_STAGE, manifest.key), PROBLEMS_FILE))
