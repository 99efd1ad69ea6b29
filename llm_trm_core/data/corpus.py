"""Plain English text for compressor stage 1a.

- `python-docs` (offline default): the prose of the documentation topics that ship with Python
  (`pydoc_data.topics`), cut into documents at paragraph boundaries. Real English, never random tokens.
- `fineweb-edu` (cloud): `HuggingFaceFW/fineweb-edu` streamed from the hub.

Documents are split into train / val / test deterministically by document id.
"""

from __future__ import annotations

import ast
import itertools
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_trm_core.config import CorpusConfig
from llm_trm_core.data.splits import content_id, unit_hash
from llm_trm_core.errors import UserError
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


def iter_corpus(cfg: CorpusConfig) -> Iterator[Document]:
    """Stream up to `cfg.num_documents` documents with their split."""
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
