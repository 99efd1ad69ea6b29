"""Plain English text for compressor stage 1a.

- `python-docs` (offline default): the prose of the documentation topics that ship with Python
  (`pydoc_data.topics`), cut into documents at paragraph boundaries. Real English, never random tokens.
- `fineweb-edu` (cloud): `HuggingFaceFW/fineweb-edu` streamed from the hub.
- `file`: your own files at `corpus.path` (a file, a folder or a glob, local or any fsspec URL such as
  `gs://`): `.txt` / `.md` files are cut at blank lines into documents of about 1000 characters (never
  across files); Parquet and JSON Lines files give one document per row of their `text` column.

Documents are split into train / val / test deterministically by document id (a content hash for
python-docs and files, so duplicates collapse).
"""

from __future__ import annotations

import ast
import itertools
import logging
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_trm_core.config import CorpusConfig
from llm_trm_core.data.files import DataFiles, iter_jsonl, kind_of, list_files, parquet_columns, read_parquet, read_text
from llm_trm_core.data.splits import content_id, unit_hash
from llm_trm_core.errors import ConfigError, UserError
from llm_trm_core.hub import require_hub

logger = logging.getLogger(__name__)

DOCUMENT_CHARS = 1000  # python-docs paragraphs are grouped into documents of about this size
_SKIP_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Document:
    id: str
    split: Literal["train", "val", "test"]
    text: str


def python_doc_topics(limit: int | None = None) -> list[str]:
    """Whole documentation topics, sorted by name (deterministic)."""
    from pydoc_data.topics import topics

    names = sorted(topics)[:limit]
    return [topics[name] for name in names]


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    # Grammar rules, code samples and tables are indented or made of markup characters.
    if any(line.startswith("   ") for line in lines):
        return False
    letters = sum(ch.isalpha() for ch in paragraph)
    return letters > 0.6 * len(paragraph) and len(paragraph.split()) >= 6


def _group(paragraphs: Iterator[str]) -> Iterator[str]:
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= DOCUMENT_CHARS:
            yield "\n\n".join(current)
            current, size = [], 0
    if current:
        yield "\n\n".join(current)


def _topic_paragraphs(topic: str) -> Iterator[str]:
    for paragraph in topic.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if _is_prose(paragraph):
            yield " ".join(line.strip() for line in paragraph.splitlines())


def _stdlib_docstrings() -> Iterator[str]:
    """Long module/class/function docstrings of the standard library, file by file in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in _SKIP_STDLIB_DIRS for part in path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:
                    yield from _topic_paragraphs(doc)


def python_doc_documents() -> Iterator[str]:
    """English prose that ships with Python, as ~1000-character documents, in a fixed order.

    First the documentation topics (`pydoc_data.topics`), then long standard-library docstrings.
    """
    for topic in python_doc_topics():
        yield from _group(_topic_paragraphs(topic))
    yield from _group(_stdlib_docstrings())


def _split(id_: str, heldout_fraction: float) -> Literal["train", "val", "test"]:
    """Held-out documents are halved: `val` for early stopping, `test` for the reported metrics."""
    u = unit_hash(id_)
    if u < heldout_fraction / 2:
        return "test"
    return "val" if u < heldout_fraction else "train"


def corpus_files(cfg: CorpusConfig) -> DataFiles:
    """The files of `corpus.source=file` (a ConfigError naming the fix when there are none)."""
    return list_files(cfg.path, "corpus.path", ("text", "parquet", "jsonl"))


def _file_texts(files: DataFiles) -> Iterator[str]:
    for path in files.paths:
        kind = kind_of(path)
        if kind == "text":
            paragraphs = (p.strip() for p in read_text(files, path).replace("\r\n", "\n").split("\n\n"))
            yield from _group(p for p in paragraphs if p)
            continue
        if kind == "parquet":
            names = parquet_columns(files, path)
            if "text" not in names:
                raise ConfigError(
                    f"{files.name(path)} has no 'text' column (it has: {', '.join(names) or 'none'}); corpus "
                    "Parquet files need one document per row in a string column named 'text'"
                )
            rows: Iterable[dict[str, object]] = read_parquet(files, path, ["text"])
        else:
            rows = iter_jsonl(files, path)
        texts = 0
        for row in rows:
            if "text" in row:
                texts += 1
            text = row.get("text")
            yield text if isinstance(text, str) else ""
        if not texts:
            raise ConfigError(
                f"{files.name(path)} has no 'text' field in any line; corpus JSON Lines files need one "
                'object per document, e.g. {"text": "..."}'
            )


def _file_documents(cfg: CorpusConfig) -> Iterator[Document]:
    files = corpus_files(cfg)
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    for text in _file_texts(files):
        if not text.strip():
            skipped["empty_text"] += 1
            continue
        id_ = content_id("file", text)
        if id_ in seen:
            skipped["duplicate_text"] += 1
            continue
        seen.add(id_)
        yield Document(id_, _split(id_, cfg.heldout_fraction), text)
        if len(seen) == cfg.num_documents:
            break
    if skipped:
        logger.warning("corpus files: skipped %s", dict(skipped))
    if not seen:
        raise ConfigError(
            f"corpus.path={cfg.path!r} holds no text ({len(files.paths)} files, skipped: {dict(skipped)}); "
            "point corpus.path at non-empty .txt files or Parquet / JSON Lines files with a 'text' column"
        )
    if len(seen) < cfg.num_documents:
        logger.warning("corpus.num_documents=%d but corpus.path gives %d documents", cfg.num_documents, len(seen))


def iter_corpus(cfg: CorpusConfig) -> Iterator[Document]:
    """Stream up to `cfg.num_documents` documents with their split."""
    if cfg.source == "file":
        yield from _file_documents(cfg)
        return
    if cfg.source == "python-docs":
        seen: set[str] = set()
        for text in python_doc_documents():
            id_ = content_id("pydoc", text)
            if id_ in seen:
                continue
            seen.add(id_)
            yield Document(id_, _split(id_, cfg.heldout_fraction), text)
            if len(seen) == cfg.num_documents:
                return
        logger.warning("corpus.num_documents=%d but Python's docs give %d documents", cfg.num_documents, len(seen))
        return

    require_hub(f"corpus.source=fineweb-edu ({cfg.hub_id})", "set corpus.source=python-docs")
    from datasets import load_dataset

    stream = load_dataset(cfg.hub_id, cfg.hub_config, split="train", streaming=True)
    count = 0
    for row in itertools.islice(stream, cfg.num_documents):
        text = str(row.get("text") or "")
        if not text.strip():
            continue
        id_ = str(row.get("id") or content_id("fineweb", text))
        count += 1
        yield Document(id_, _split(id_, cfg.heldout_fraction), text)
    if count == 0:
        raise UserError(f"the corpus {cfg.hub_id}/{cfg.hub_config} yielded no text")
