"""On a CUDA device (opt in: `./run pytest -m gpu`; skipped without CUDA): the rehearsal in bfloat16 on the
GPU, and the memory model of bench/gpu_cost_model.py against measured peaks of the full-width stand-in.

The model's per-layer terms are checked at 1 and 2 layers (what fits a test) within MARGIN of
torch.cuda.max_memory_allocated; the README's 36-layer figures extrapolate exactly those terms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.35  # |estimate - measured| / measured


def _standin(layers: int) -> torch.nn.Module:
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from llm_trm_core.rehearsal import SMOLLM3_3B as S

    config = SmolLM3Config(
        vocab_size=S["vocab_size"], hidden_size=S["hidden_size"], intermediate_size=S["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=S["num_heads"], num_key_value_heads=S["num_kv_heads"],
        tie_word_embeddings=True,
    )  # fmt: skip
    return SmolLM3ForCausalLM(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)


def _measure(fn: object) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


@pytest.mark.parametrize("layers", [1, 2])
def test_generation_memory_matches_the_model(layers: int) -> None:
    from bench.gpu_cost_model import inference_peak, model_shapes

    model = _standin(layers)
    batch, prompt, new = 32, 180, 256
    ids = torch.randint(0, 1000, (batch, prompt), device="cuda")
    measured = _measure(lambda: model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False))
    estimate = inference_peak(model_shapes(layers), batch, prompt + new, batch)
    assert abs(estimate - measured) / measured < MARGIN, (estimate / 2**30, measured / 2**30)


@pytest.mark.parametrize("layers", [1, 2])
def test_backward_memory_matches_the_model(layers: int) -> None:
    from bench.gpu_cost_model import model_shapes, training_peak
    from llm_trm_core.grpo.rollout import LOGIT_CHUNK, token_log_probs

    model = _standin(layers)
    batch, seq, answer = 8, 440, 256

    def step() -> None:
        embeds = model.get_input_embeddings()(torch.randint(0, 1000, (batch, seq), device="cuda"))
        embeds.requires_grad_(True)
        hidden = model.model(inputs_embeds=embeds)[0][:, -answer:]
        targets = torch.randint(0, 1000, (batch, answer), device="cuda")
        logp, _ = token_log_probs(model.get_output_embeddings(), hidden, targets, 1.0)
        logp.sum().backward()

    measured = _measure(step)
    estimate = training_peak(model_shapes(layers), batch, seq, batch * LOGIT_CHUNK)
    assert abs(estimate - measured) / measured < MARGIN, (estimate / 2**30, measured / 2**30)


def test_rehearsal_in_bf16_on_the_device(tmp_path: Path) -> None:
    workdir = Path(os.environ.get("LLM_TRM_REHEARSAL_DIR", tmp_path / "rehearsal"))
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "rehearse", "--workdir", str(workdir), "--store",
         f"file://{tmp_path / 'store'}", "--json", str(out), "model.dtype=bfloat16", "runtime.device=cuda"],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["states"] == ["Completed"] for row in rows)
