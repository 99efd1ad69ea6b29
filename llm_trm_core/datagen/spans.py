"""Where a generated thinking span ends, decided on the decoded text (pure functions).

The generated continuation of a think-mode prompt is cut into the thinking trace, which always ends
with the end-of-thinking delimiter, and a failure reason when there is no usable span:

- `delimiter`: the model wrote `</think>` itself;
- `answer_marker`: the model started its final answer (e.g. `####`) with the span open, and
  `</think>` is inserted just before the marker (models without a thinking mode);
- `eos`: the model ended its turn with the span open, and `</think>` is inserted at the end
  (only with close_on_eos);
- `budget`: the span was still open at max_new_tokens, and `</think>` is inserted (only with
  close_on_budget).
Failures: `no_start` (a native thinking model did not open the span), `no_end` (turn ended with the
span open), `truncated` (budget exhausted with the span open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EndSource = Literal["delimiter", "answer_marker", "eos", "budget"]


@dataclass(frozen=True)
class SpanResult:
    trace_text: str | None  # text of the span after the prompt, ending with the end delimiter
    end_source: EndSource | None
    failure: str | None


def close_span(
    text: str,
    *,
    start: str,
    end: str,
    native: bool,
    ended_by_eos: bool,
    answer_markers: tuple[str, ...] = (),
    close_on_eos: bool = False,
    close_on_budget: bool = False,
) -> SpanResult:
    """Cut `text` (the generated continuation, special tokens kept, cut at EOS) into a thinking trace."""
    if native and not text.lstrip().startswith(start):
        return SpanResult(None, None, "no_start")
    search_from = text.index(start) + len(start) if native else 0
    end_at = text.find(end, search_from)
    markers = [(text.find(m, search_from), m) for m in answer_markers]
    first_marker = min(((i, m) for i, m in markers if i >= 0), default=None)
    if end_at >= 0 and (first_marker is None or end_at <= first_marker[0]):
        return SpanResult(text[: end_at + len(end)], "delimiter", None)
    if first_marker is not None:
        return SpanResult(_closed(text[: first_marker[0]], end), "answer_marker", None)
    if ended_by_eos:
        return SpanResult(_closed(text, end), "eos", None) if close_on_eos else SpanResult(None, None, "no_end")
    if close_on_budget:
        return SpanResult(_closed(text, end), "budget", None)
    return SpanResult(None, None, "truncated")


def _closed(body: str, end: str) -> str:
    return f"{body.rstrip()}\n{end}"
