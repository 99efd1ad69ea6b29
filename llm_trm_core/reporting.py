"""Small helpers to present metrics: flattening, markdown tables, PNG plots as bytes."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

HEADLINE_METRICS = ("cosine", "cosine_centered", "fvu", "rel_error", "lm_kl", "lm_top1")


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def comparison_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows `{name, <headline metrics>}` for the model (`test`) and each baseline, when present."""
    rows = []
    if isinstance(metrics.get("test"), Mapping):
        rows.append({"name": "model", **{m: metrics["test"].get(m) for m in HEADLINE_METRICS}})
    for name, values in (metrics.get("baselines") or {}).items():
        rows.append({"name": f"baseline: {name}", **{m: values.get(m) for m in HEADLINE_METRICS}})
    return rows


def png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """An inline image (data URI) that renders in the Prefect UI without any file server."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
