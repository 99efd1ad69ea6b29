"""The answer module, table-driven: extraction and numeric comparison on tricky cases."""

from __future__ import annotations

import pytest

from llm_trm_core.data.answers import (
    extract_answer,
    extract_flexible,
    extract_strict,
    grade,
    numbers_equal,
    parse_gold,
    parse_number,
)

# text, our value, our method, strict value, flexible value
CASES = [
    ("#### 72", 72, "strict", 72, 72),
    ("So she has 5 left.\n#### 1,234", 1234, "strict", 1234, 1234),
    ("#### $18.00", 18, "strict", 18, 18),
    ("It drops by 5.\n#### -5", -5, "strict", -5, -5),
    ("#### −7", -7, "strict", -7, -7),  # unicode minus
    ("The answer is 3.5 apples.", 3.5, "answer_is", None, 3.5),
    ("the answer is: 1,000.", 1000, "answer_is", None, 1000),
    ("Thus \\boxed{42} is it, from 6 * 7", 42, "boxed", None, 7),
    ("She pays $4 for 2 pens, so 18.", 18, "last_number", None, 18),
    ("3 apples and 4 oranges make 7 fruits", 7, "last_number", None, 7),
    ("He saved 50%", 50, "last_number", None, 50),
    ("Population: 2,000,000 people", 2_000_000, "last_number", None, 2_000_000),
    ("Half of it: 1/2", 0.5, "last_number", None, 0.5),
    ("It costs .5 dollars", 0.5, "last_number", None, 0.5),
    ("<think>maybe 99 or #### 98</think>The total is 12", 12, "last_number", None, 12),
    ("<think>#### 3</think>\n#### 4", 4, "strict", 4, 4),
    ("I am not sure.", None, None, None, None),
    ("", None, None, None, None),
]


@pytest.mark.parametrize(("text", "value", "method", "strict", "flexible"), CASES)
def test_extraction_table(text: str, value: float | None, method: str | None, strict, flexible) -> None:
    got = extract_answer(text)
    assert got.value == value
    assert got.method == method
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        (18.0, 18, True),
        (parse_number("18.00"), 18, True),
        (parse_number("$1,234"), 1234, True),
        (parse_number("0.50"), 0.5, True),
        (parse_number("-3"), 3, False),
        (0.1 + 0.2, 0.3, True),  # float noise is not a wrong answer
        (1_000_000.0, 1_000_001, False),
        (None, 0, False),
    ],
)
def test_numeric_comparison(pred: float | None, gold: float, equal: bool) -> None:
    assert numbers_equal(pred, gold) is equal


@pytest.mark.parametrize(
    ("text", "value"),
    [("18.", 18), ("$ 5", 5), ("1,234.50", 1234.5), ("12%", 12), ("3/4", 0.75), ("1/0", None), ("abc", None)],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


def test_gold_parsing() -> None:
    assert parse_gold("48/2 = <<48/2=24>>24 clips.\n#### 72") == 72
    assert parse_gold("#### 1,200") == 1200
    assert parse_gold("no marker 12") is None
    assert parse_gold("#### ") is None


def test_grade_reports_all_three_scores() -> None:
    g = grade("<think>...</think>The answer is 72, not 70", 72)
    assert (g.strict, g.flexible, g.numeric) == (False, False, True)
    assert g.extracted.method == "answer_is"
