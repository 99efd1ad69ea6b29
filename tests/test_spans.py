"""Where a thinking span ends: table-driven."""

from __future__ import annotations

import pytest

from llm_trm_core.datagen.spans import close_span

T0, T1 = "<think>", "</think>"


@pytest.mark.parametrize(
    ("text", "native", "eos", "options", "trace", "source", "failure"),
    [
        ("a b </think> answer", False, True, {}, "a b </think>", "delimiter", None),
        ("<think>\nx y</think>\n42", True, True, {}, "<think>\nx y</think>", "delimiter", None),
        ("The sum is 5", True, True, {}, None, None, "no_start"),
        ("<think> still thinking", True, True, {}, None, None, "no_end"),
        ("<think> still thinking", True, False, {}, None, None, "truncated"),
        ("2 + 3 = 5\n#### 5", False, True, {"answer_markers": ("####",)}, "2 + 3 = 5\n</think>", "answer_marker", None),
        ("x #### 5 </think>", False, True, {"answer_markers": ("####",)}, "x\n</think>", "answer_marker", None),
        ("x </think> #### 5", False, True, {"answer_markers": ("####",)}, "x </think>", "delimiter", None),
        ("step 1, step 2.  ", False, True, {"close_on_eos": True}, "step 1, step 2.\n</think>", "eos", None),
        ("step 1, step 2", False, True, {}, None, None, "no_end"),
        ("step 1, st", False, False, {"close_on_eos": True}, None, None, "truncated"),
        ("step 1, st", False, False, {"close_on_budget": True}, "step 1, st\n</think>", "budget", None),
        # a literal </think> before the model's own <think> does not count for a native model
        ("<think> a </think>", True, True, {}, "<think> a </think>", "delimiter", None),
    ],
)
def test_close_span(text, native, eos, options, trace, source, failure) -> None:
    result = close_span(text, start=T0, end=T1, native=native, ended_by_eos=eos, **options)
    assert (result.trace_text, result.end_source, result.failure) == (trace, source, failure)
    if result.trace_text is not None:
        assert result.trace_text.endswith(T1)
