"""The one answer module: extraction from model output and numeric comparison.

Three scores, as GSM8K papers report them (docs/evaluation.md):
- strict: only `#### N` counts (OpenAI's reference extractor, lm-eval `strict-match`);
- flexible: the last number-like span (lm-eval `flexible-extract`);
- numeric (ours): `#### N`, then `\\boxed{N}`, then `answer is N`, then the last number, compared as
  numbers so that `18.0 == 18`, `$1,234` == 1234 and `50%` == 50.
Text up to the last `</think>` is ignored: only the answer after the thinking span is graded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Method = Literal["strict", "boxed", "answer_is", "last_number"]

_NUM = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?%?|[-−]?\.\d+"
NUMBER_RE = re.compile(_NUM)
STRICT_RE = re.compile(r"####\s*(" + _NUM + r")")
BOXED_RE = re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}")
ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*(" + _NUM + r")", re.IGNORECASE)
THINK_END = "</think>"


@dataclass(frozen=True)
class ExtractedAnswer:
    value: float | None
    method: Method | None
    raw: str | None


def parse_number(text: str) -> float | None:
    """`$1,234.50` -> 1234.5, `18.` -> 18, `−7` -> -7, `50%` -> 50, `3/4` -> 0.75; None if not a number."""
    s = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".").removesuffix("%")
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = parse_number(num), parse_number(den)
        return None if a is None or not b else a / b
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answer_part(text: str) -> str:
    """The text after the last `</think>` (all of it when there is none)."""
    return text.rsplit(THINK_END, 1)[-1]


def extract_strict(text: str) -> float | None:
    match = STRICT_RE.search(answer_part(text))
    return parse_number(match.group(1)) if match else None


def extract_flexible(text: str) -> float | None:
    matches = NUMBER_RE.findall(answer_part(text))
    return parse_number(matches[-1]) if matches else None


def extract_answer(text: str) -> ExtractedAnswer:
    """Our extractor: `#### N` > `\\boxed{N}` > `answer is N` > last number."""
    part = answer_part(text)
    for method, pattern in (("strict", STRICT_RE), ("boxed", BOXED_RE), ("answer_is", ANSWER_IS_RE)):
        match = pattern.search(part)
        if match and (value := parse_number(match.group(1))) is not None:
            return ExtractedAnswer(value, method, match.group(1).strip())  # type: ignore[arg-type]
    matches = NUMBER_RE.findall(part)
    if matches and (value := parse_number(matches[-1])) is not None:
        return ExtractedAnswer(value, "last_number", matches[-1].strip())
    return ExtractedAnswer(None, None, None)


def numbers_equal(pred: float | None, gold: float) -> bool:
    return pred is not None and math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-6)


def parse_gold(answer_text: str) -> float | None:
    """Gold value of a GSM8K answer (`... #### 72`)."""
    if "####" not in answer_text:
        return None
    match = NUMBER_RE.search(answer_text.rsplit("####", 1)[-1])
    return parse_number(match.group(0)) if match else None


@dataclass(frozen=True)
class Grade:
    strict: bool
    flexible: bool
    numeric: bool
    extracted: ExtractedAnswer


def grade(text: str, gold: float) -> Grade:
    extracted = extract_answer(text)
    return Grade(
        strict=numbers_equal(extract_strict(text), gold),
        flexible=numbers_equal(extract_flexible(text), gold),
        numeric=numbers_equal(extracted.value, gold),
        extracted=extracted,
    )
