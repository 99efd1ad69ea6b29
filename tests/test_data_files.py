"""Your own data: problem and corpus files (Parquet, JSON Lines, text; local, memory://, gs://), the
stratified datagen selection on a GSM8K-shaped file, and the plan check that runs before any model loads."""

from __future__ import annotations

import gzip
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_trm_core.config import CorpusConfig, ProblemsConfig, load_config
from llm_trm_core.data.corpus import iter_corpus
from llm_trm_core.data.problems import _assign_split, load_problems, read_problems
from llm_trm_core.errors import ConfigError
from llm_trm_core.plan import COMMAND_STAGES, check_plan, plan_counts
from llm_trm_core.stages.datagen import datagen_problems, plan_shards
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.store import ArtifactStore


def _gsm_rows(n: int, split: str | None, start: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        row: dict[str, Any] = {
            "question": f"Ann has {i} apples and buys {i + 3} more. How many apples does she have?",
            "answer": f"She has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}",
        }
        if split is not None:
            row["split"] = split
        rows.append(row)
    return rows


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def gsm_file(tmp_path: Path) -> Path:
    """GSM8K's shape: every train row first, then the test rows, no val rows."""
    return _parquet(tmp_path / "gsm.parquet", _gsm_rows(170, "train") + _gsm_rows(30, "test", start=1000))


def test_gsm8k_shaped_parquet_keeps_its_test_split_and_holds_val_out_of_train(gsm_file: Path) -> None:
    cfg = ProblemsConfig(source="file", path=str(gsm_file), val_fraction=0.1)
    ps = load_problems(cfg)
    counts = ps.counts()
    assert counts["test"] == 30 and counts["train"] + counts["val"] == 170 and counts["val"] > 5
    assert all(p.split == "test" for p in ps.problems[170:])  # the file's test rows, in file order
    for p in ps.problems[:170]:  # val is cut out of train by id, as for GSM8K from the hub
        assert p.split == _assign_split(p.id, 0.0, 0.1)
    assert ps.problems[0].answer_value == 3.0 and ps.problems[0].id.startswith("file-")
    assert load_problems(cfg).problems == ps.problems  # deterministic


def test_datagen_selection_of_a_train_first_file_includes_test_problems(gsm_file: Path) -> None:
    cfg = load_config(
        "tiny",
        [f"store.root=memory://files-{uuid.uuid4().hex[:8]}", "problems.source=file", f"problems.path={gsm_file}"],
    )
    store = ArtifactStore(cfg.store.root)
    manifest = run_problems(cfg, store)
    sizes = read_problems(store, manifest).counts()
    chosen = datagen_problems(store, manifest, cfg)  # tiny: datagen.num_problems=24
    per_split = Counter(p.split for p in chosen)
    assert len(chosen) == 24 and per_split["test"] > 0 and per_split["val"] > 0
    for split in ("train", "val", "test"):  # proportional to the split sizes, to within one
        assert abs(per_split[split] - 24 * sizes[split] / 200) <= 1, (split, per_split, sizes)
    assert plan_counts(cfg)["datagen"] == dict(per_split)  # the plan predicts the stage's selection
    # a larger count extends the smaller one: shard index ranges keep naming the same problems
    bigger = datagen_problems(
        store, manifest, cfg.model_copy(update={"datagen": cfg.datagen.model_copy(update={"num_problems": 60})})
    )
    assert [p.id for p in bigger[:24]] == [p.id for p in chosen]
    assert plan_shards(cfg, len(chosen))[-1].end == 24
    check_plan(cfg)  # every stage has what it needs


def test_jsonl_without_split_column_is_cut_by_id_and_bad_rows_are_counted(tmp_path: Path) -> None:
    rows: list[Any] = _gsm_rows(60, None)
    rows += [
        {"question": "", "answer": "#### 1"},
        {"question": "   ", "answer": "#### 1"},
        {"question": "No marker?", "answer": "the answer is four"},
        {"question": "Missing answer?"},
        {"question": rows[0]["question"], "answer": "#### 3"},  # duplicate question
        {"question": "What is 6 times 7?", "answer": 42},  # a plain number is a gold value too
        {"question": "What is half of 5?", "answer": 2.5},
    ]
    path = tmp_path / "mine.jsonl.gz"  # compressed JSON Lines, inferred from the name
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    cfg = ProblemsConfig(source="file", path=str(path), test_fraction=0.25, val_fraction=0.15)
    ps = load_problems(cfg)
    assert len(ps.problems) == 62
    assert ps.rejected == {"empty_question": 2, "no_parseable_gold_answer": 2, "duplicate_question": 1}
    for p in ps.problems:
        assert p.split == _assign_split(p.id, 0.25, 0.15)
    numbers = {p.question: (p.answer_value, p.answer_text) for p in ps.problems[-2:]}
    assert numbers == {"What is 6 times 7?": (42.0, "#### 42"), "What is half of 5?": (2.5, "#### 2.5")}

    # the problems manifest counts the rejections, as for the generated sources
    cfg_all = load_config(
        "tiny",
        [f"store.root=memory://rej-{uuid.uuid4().hex[:8]}", "problems.source=file", f"problems.path={path}"],
    ).model_copy(update={"problems": cfg})
    manifest = run_problems(cfg_all, ArtifactStore(cfg_all.store.root))
    assert manifest.metrics["total"] == 62 and manifest.metrics["rejected_empty_question"] == 2
    assert manifest.metrics["rejected_duplicate_question"] == 1 and manifest.metrics["source"] == "file"


def test_split_values_explicit_val_aliases_and_empty_ones(tmp_path: Path) -> None:
    rows = _gsm_rows(20, "train") + _gsm_rows(5, "Validation", start=100) + _gsm_rows(6, "test", start=200)
    rows[0]["split"] = None  # counted, not guessed
    rows[1]["split"] = " "
    ps = load_problems(ProblemsConfig(source="file", path=str(_jsonl(tmp_path / "p.jsonl", rows))))
    assert ps.counts() == {"train": 18, "val": 5, "test": 6}  # explicit val rows: train stays train
    assert ps.rejected == {"no_split": 2}


def test_a_folder_or_glob_of_files_reads_them_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "problems"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", _gsm_rows(5, "test", start=100))
    _parquet(folder / "a.parquet", _gsm_rows(10, "train"))
    (folder / "README.md").write_text("not data")  # a folder keeps only problem files
    by_folder = load_problems(ProblemsConfig(source="file", path=str(folder), val_fraction=0.0))
    by_glob = load_problems(ProblemsConfig(source="file", path=f"{folder}/[ab].*", val_fraction=0.0))
    assert by_folder.problems == by_glob.problems
    assert [p.split for p in by_folder.problems] == ["train"] * 10 + ["test"] * 5


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "noanswer.parquet",
            [{"question": "q?", "solution": "#### 1"}],
            r"noanswer.parquet has no 'answer' column.*solution",
        ),
        ("noq.jsonl", [{"prompt": "q?", "answer": "#### 1"}], r"noq.jsonl has no 'question' field in any line"),
        ("bad.jsonl", '{"question": "q?", "answer": "#### 1"}\n{oops\n', r"bad.jsonl line 2 is not valid JSON"),
        ("list.jsonl", "[1, 2]\n", r"list.jsonl line 1 is not a JSON object"),
        (
            "split.jsonl",
            [{"question": "q?", "answer": "#### 1", "split": "holdout"}],
            r"split value 'holdout' is not one of",
        ),
        (
            "notest.jsonl",
            [{"question": "q?", "answer": "#### 1", "split": "train"}],
            r"no usable test rows.*split=test",
        ),
        ("notrain.jsonl", [{"question": "q?", "answer": "#### 1", "split": "test"}], r"no usable train rows"),
        ("gold.jsonl", [{"question": "q?", "answer": "four"}], r"none of its 1 rows is usable.*'#### N'"),
        ("empty.jsonl", "", r"empty.jsonl has no 'question' or 'answer' field"),
        ("table.csv", "question,answer\n", r"table.csv is not a supported file; use .parquet"),
        ("junk.parquet", "not parquet", r"junk.parquet is not a readable Parquet file"),
    ],
)
def test_bad_problem_files_are_one_line_config_errors_naming_the_file(
    tmp_path: Path, name: str, content: Any, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif name.endswith(".parquet"):
        _parquet(path, content)
    else:
        _jsonl(path, content)
    with pytest.raises(ConfigError, match=message) as info:
        load_problems(ProblemsConfig(source="file", path=str(path)))
    assert "\n" not in str(info.value)


def test_missing_paths_and_mixed_split_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"problems.path='.*nowhere.parquet': no such file or folder"):
        load_problems(ProblemsConfig(source="file", path=str(tmp_path / "nowhere.parquet")))
    with pytest.raises(ConfigError, match=r"matches no files; point problems.path at your data"):
        load_problems(ProblemsConfig(source="file", path=str(tmp_path / "*.jsonl")))
    with pytest.raises(ConfigError, match="problems.source=file needs problems.path"):
        load_config("tiny", ["problems.source=file"])
    _jsonl(tmp_path / "a.jsonl", _gsm_rows(3, "train"))
    _jsonl(tmp_path / "b.jsonl", _gsm_rows(3, None, start=50))
    with pytest.raises(ConfigError, match=r"b.jsonl has no split column but .*a.jsonl has one"):
        load_problems(ProblemsConfig(source="file", path=str(tmp_path / "*.jsonl")))


def test_remote_problem_and_corpus_files_through_fsspec() -> None:
    fs = fsspec.filesystem("memory")
    root = f"/data-{uuid.uuid4().hex[:8]}"
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(_gsm_rows(40, "train") + _gsm_rows(10, "test", start=500)), buffer)
    fs.pipe(f"{root}/gsm.parquet", buffer.getvalue().to_pybytes())
    fs.pipe(f"{root}/texts/a.txt", b"First paragraph of plain English text.\n\nA second paragraph follows here.")
    fs.pipe(f"{root}/texts/b.txt", b"Another file, another document.")
    ps = load_problems(ProblemsConfig(source="file", path=f"memory://{root}/gsm.parquet"))
    assert ps.counts()["test"] == 10 and len(ps.problems) == 50
    docs = list(iter_corpus(CorpusConfig(source="file", path=f"memory://{root}/texts/*.txt", num_documents=10)))
    assert [d.text for d in docs] == [
        "First paragraph of plain English text.\n\nA second paragraph follows here.",
        "Another file, another document.",
    ]
    with pytest.raises(ConfigError, match=r"memory:///data-.*/texts/missing.txt': no such file"):
        list(iter_corpus(CorpusConfig(source="file", path=f"memory://{root}/texts/missing.txt")))


def test_gcs_problem_file(gcs_emulator: str) -> None:
    from tests.conftest import GCS_BUCKET

    url = f"gs://{GCS_BUCKET}/data-{uuid.uuid4().hex[:8]}/gsm.jsonl"
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe(path, "".join(json.dumps(r) + "\n" for r in _gsm_rows(12, "train") + _gsm_rows(4, "test", 99)).encode())
    ps = load_problems(ProblemsConfig(source="file", path=url))
    assert ps.counts()["test"] == 4 and len(ps.problems) == 16


def test_corpus_files_txt_parquet_and_jsonl(tmp_path: Path) -> None:
    paragraph = "This is a sentence of ordinary English prose about reading and writing data files. "
    long_text = "\n\n".join(paragraph * 3 + str(i) for i in range(12))  # ~3000 characters: several documents
    (tmp_path / "book.txt").write_text(long_text, encoding="utf-8")
    _parquet(tmp_path / "rows.parquet", [{"text": f"Parquet document {i}."} for i in range(5)] + [{"text": ""}])
    _jsonl(tmp_path / "rows.jsonl", [{"text": "A JSON document."}, {"text": "A JSON document."}, {"other": 1}])
    cfg = CorpusConfig(source="file", path=str(tmp_path), num_documents=100, heldout_fraction=0.4)
    docs = list(iter_corpus(cfg))
    assert docs == list(iter_corpus(cfg))
    book = [d for d in docs if d.text.startswith("This is")]
    assert len(book) >= 3 and all(len(d.text) >= 1000 for d in book[:-1])  # cut at blank lines, ~1000 chars
    assert "\n\n".join(d.text for d in book) == long_text  # nothing lost, nothing across files
    assert [d.text for d in docs if not d.text.startswith("This is")] == [
        "A JSON document.",  # duplicates collapse, rows without text are skipped
        *(f"Parquet document {i}." for i in range(5)),
    ]
    assert len({d.id for d in docs}) == len(docs) and {d.split for d in docs} <= {"train", "val", "test"}
    assert len(list(iter_corpus(cfg.model_copy(update={"num_documents": 4})))) == 4


def test_bad_corpus_files_are_refused(tmp_path: Path) -> None:
    _parquet(tmp_path / "x.parquet", [{"body": "text"}])
    with pytest.raises(ConfigError, match=r"x.parquet has no 'text' column \(it has: body\)"):
        list(iter_corpus(CorpusConfig(source="file", path=str(tmp_path / "x.parquet"))))
    with pytest.raises(ConfigError, match=r"corpus.path='.*\*.txt' matches no files"):
        list(iter_corpus(CorpusConfig(source="file", path=str(tmp_path / "*.txt"))))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ConfigError, match="holds no text"):
        list(iter_corpus(CorpusConfig(source="file", path=str(tmp_path / "blank.txt"))))
    with pytest.raises(ConfigError, match="corpus.source=file needs corpus.path"):
        load_config("tiny", ["corpus.source=file"])


# ---------------------------------------------------------------------------------------------
# check_plan


def _no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    import llm_trm_core.lm as lm

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("check_plan loaded a model")

    monkeypatch.setattr(lm, "load_language_model", refuse)


@pytest.mark.parametrize("preset", ["tiny", "local", "smollm3-3b"])
def test_presets_pass_the_plan_check_without_loading_a_model(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_models(monkeypatch)
    cfg = load_config(preset)
    check_plan(cfg)
    counts = plan_counts(cfg)
    assert all(counts["datagen"][split] > 0 for split in ("train", "val", "test"))
    if preset == "smollm3-3b":  # GSM8K's official sizes, no download: 1000 = 765 train / 85 val / 150 test
        assert counts["problems"] == {"train": 6726, "val": 747, "test": 1319}
        assert counts["datagen"] == {"train": 765, "val": 85, "test": 150}
        assert counts["evaluate"] == {"test": 1319}


def test_plan_refuses_a_datagen_count_that_leaves_a_split_empty(gsm_file: Path) -> None:
    cfg = load_config("tiny", ["problems.source=file", f"problems.path={gsm_file}", "datagen.num_problems=3"])
    with pytest.raises(
        ConfigError, match=r"datagen.num_problems=3 takes no val/test problems.*datagen.num_problems >= (\d+)"
    ) as info:
        check_plan(cfg)
    minimum = int(str(info.value).rsplit(">= ", 1)[1])
    check_plan(
        load_config("tiny", ["problems.source=file", f"problems.path={gsm_file}", f"datagen.num_problems={minimum}"])
    )
    with pytest.raises(ConfigError):
        check_plan(
            load_config(
                "tiny", ["problems.source=file", f"problems.path={gsm_file}", f"datagen.num_problems={minimum - 1}"]
            )
        )
    check_plan(cfg, COMMAND_STAGES["datagen"])  # generation alone needs no split in particular


@pytest.mark.parametrize(
    ("overrides", "stages", "message"),
    [
        (
            ["problems.val_fraction=0"],
            None,
            r"val problems are needed by trace-hiddens.*set problems.val_fraction above 0.*or add split=val rows",
        ),
        (["problems.val_fraction=0"], ("problems", "latent"), r"val problems are needed by latent"),
        (["problems.val_fraction=0"], COMMAND_STAGES["datagen"], None),
    ],
)
def test_plan_names_the_problem_field_to_change(
    gsm_file: Path, overrides: list[str], stages: tuple[str, ...] | None, message: str | None
) -> None:
    cfg = load_config("tiny", ["problems.source=file", f"problems.path={gsm_file}", *overrides])
    if message is None:
        check_plan(cfg, stages)
    else:
        with pytest.raises(ConfigError, match=message):
            check_plan(cfg, stages)


def test_plan_checks_generated_sources_grpo_problems_and_corpus_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"test problems are needed by evaluate.*set problems.test_fraction above 0"):
        check_plan(load_config("tiny", ["problems.test_fraction=0"]), COMMAND_STAGES["evaluate"][-1:])
    with pytest.raises(ConfigError, match=r"val problems are needed by .*raise problems.num_generated \(now 2\)"):
        check_plan(load_config("tiny", ["problems.num_generated=2"]))
    with pytest.raises(
        ConfigError, match=r"test problems are needed by grpo \(on grpo.problems\).*grpo.problems.test_fraction"
    ):
        check_plan(load_config("tiny", ["grpo.problems.test_fraction=0"]))
    with pytest.raises(ConfigError, match=r"corpus.path=.*matches no files"):
        check_plan(load_config("tiny", ["corpus.source=file", f"corpus.path={tmp_path}/*.txt"]))
    check_plan(load_config("tiny", ["corpus.source=file", f"corpus.path={tmp_path}/*.txt"]), COMMAND_STAGES["datagen"])
    with pytest.raises(ConfigError, match=r"set problems.val_fraction above 0"):  # GSM8K on the hub, no download
        check_plan(load_config("smollm3-3b", ["problems.val_fraction=0"]))


def test_an_edited_file_under_the_same_name_changes_the_artifact_keys(tmp_path: Path) -> None:
    from llm_trm_core.stages.keys import key_for

    problems = _jsonl(tmp_path / "gsm.jsonl", _gsm_rows(12, "train") + _gsm_rows(4, "test", start=12))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First paragraph of text.\n\nSecond paragraph.\n")
    cfg = load_config(
        "tiny",
        ["problems.source=file", f"problems.path={problems}", "corpus.source=file", f"corpus.path={corpus}"],
    )
    before = {stage: key_for(cfg, stage) for stage in ("problems", "hiddens")}
    assert before == {stage: key_for(cfg, stage) for stage in ("problems", "hiddens")}  # stable
    _jsonl(problems, _gsm_rows(12, "train", start=100) + _gsm_rows(4, "test", start=12))
    corpus.write_text("Another text entirely, and longer than the first one.\n")
    after = {stage: key_for(cfg, stage) for stage in ("problems", "hiddens")}
    assert before["problems"] != after["problems"] and before["hiddens"] != after["hiddens"]

    # the path does not enter the key of the other sources
    generated = load_config("tiny")
    assert key_for(generated, "problems") == key_for(load_config("tiny", ["problems.path=unused.jsonl"]), "problems")
    assert key_for(generated, "hiddens") == key_for(load_config("tiny", ["corpus.path=unused.txt"]), "hiddens")
