"""GPU cost and memory model of the full smollm3-3b preset: per stage, tokens, FLOPs, bytes written to the
store and peak GPU memory, on an 80 GB and a 40 GB card. Estimates, not measurements.

    ./run python -m bench.gpu_cost_model              # the table (markdown), as in the README
    ./run python -m bench.gpu_cost_model --json       # one JSON line per stage and card

Shapes come from the code: the parameter counts are those of `SmolLM3ForCausalLM` built on the meta device
with SmolLM3-3B's config (llm_trm_core.rehearsal.SMOLLM3_3B: 36 layers, hidden 2048, MLP 11008, 16 / 4
heads, vocabulary 128256), the counts and batch sizes are the preset's (`load_config("smollm3-3b")`), the
stored dtypes are the stages' (float16 states, float32 LM head and pairs). Memory per layer is what the
rehearsal runs at full width (2 layers) and the GPU tests measure (tests/test_gpu_rehearsal.py: the
estimate for 1 and 2 layers against torch.cuda.max_memory_allocated), extrapolated to 36 layers.

Token lengths that only a real run knows are stated assumptions (`ASSUMED`): GSM8K prompts of ~180
tokens with the system prompt, thinking spans at their 2048-token budget (an upper bound), ~8 answer
tokens for `#### N`, GRPO completions at their budget. Time assumes dense bf16 at `MFU` of the card's peak
for prefill and training, and memory-bandwidth-bound decoding (weights + KV cache read once per step).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from llm_trm_core.config import PipelineConfig, load_config
from llm_trm_core.rehearsal import SMOLLM3_3B

ASSUMED = {"prompt_tokens": 180, "answer_tokens": 8, "think_tokens": None}  # None: the datagen budget
MFU = 0.4
GB = 1e9
CARDS = {  # name: (memory GB, dense bf16 TFLOP/s, HBM TB/s)
    "80GB (H100 SXM)": (80, 989.0, 3.35),
    "40GB (A100)": (40, 312.0, 1.55),
}
BF16, FP16, FP32 = 2, 2, 4
CUDA_CONTEXT = 0.6 * GB  # CUDA context + allocator slack not seen by max_memory_allocated


@dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layer_params: int  # parameters of one decoder layer (from the module)
    embed_params: int  # the tied embedding / LM head

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + self.hidden

    def kv_bytes_per_token(self, dtype: int = BF16) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype

    def act_bytes_per_token_layer(self, dtype: int = BF16) -> int:
        """Activations one decoder layer saves for backward, per token (inputs of the norms, q/k/v/o
        projections, attention output, gate/up/act/down of the MLP)."""
        d, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return (6 * d + 2 * kv + 4 * f) * dtype

    def forward_flops_per_token(self, context: int, head: bool) -> float:
        attention = 4 * self.layers * context * self.hidden  # QK^T and AV over the context
        return 2 * self.layers * self.layer_params + attention + (2 * self.hidden * self.vocab if head else 0)


def model_shapes(layers: int = SMOLLM3_3B["num_layers"]) -> Shapes:
    """Counted from the real module on the meta device (no memory)."""
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    s = SMOLLM3_3B
    config = SmolLM3Config(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=1,
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = SmolLM3ForCausalLM(config)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    embed = model.model.embed_tokens.weight.numel()
    return Shapes(
        layers,
        s["hidden_size"],
        s["intermediate_size"],
        s["num_heads"],
        s["num_kv_heads"],
        s["vocab_size"],
        layer,
        embed,
    )


def inference_peak(shapes: Shapes, batch: int, seq: int, logits_rows: int) -> float:
    """Bytes allocated at the peak of batched generation (no grad): bf16 weights + KV cache of `batch` x `seq`
    + one layer's transient activations + float32 logits of `logits_rows` rows (CUDA context not included)."""
    transient = batch * seq * (4 * shapes.hidden + 3 * shapes.intermediate) * BF16
    kv = batch * seq * shapes.kv_bytes_per_token()
    return shapes.params * BF16 + kv + transient + logits_rows * shapes.vocab * FP32


def training_peak(shapes: Shapes, batch: int, seq: int, logit_rows: int) -> float:
    """Bytes allocated at the peak of a backward through the frozen LM (gradients reach the input embeddings):
    bf16 weights + every layer's saved activations + 3 float32 copies of `logit_rows` vocabulary rows."""
    saved = batch * seq * shapes.layers * shapes.act_bytes_per_token_layer()
    return shapes.params * BF16 + saved + 3 * logit_rows * shapes.vocab * FP32


@dataclass
class StageCost:
    stage: str
    tokens: float  # tokens through the LM (prefill + decoded + teacher-forced), or rows for non-LM stages
    flops: float
    bytes_written: float
    peak: float  # GPU bytes
    decode_steps: float = 0.0  # sequential decode steps (batches x new tokens), for the time estimate
    decode_bytes: float = 0.0  # bytes read per decode step
    note: str = ""


def estimate(cfg: PipelineConfig, shapes: Shapes) -> list[StageCost]:
    c, dg, lat, ev, gr = cfg.compressor, cfg.datagen, cfg.latent, cfg.evaluate, cfg.grpo
    weights = shapes.params * BF16
    d, v = shapes.hidden, shapes.vocab
    prompt, answer = ASSUMED["prompt_tokens"], ASSUMED["answer_tokens"]
    think = ASSUMED["think_tokens"] or dg.max_new_tokens
    head_file = v * d * BF16  # lm-head artifact, stored once (model dtype), shared by both hidden-states stages
    out: list[StageCost] = []

    def infer_peak(batch: int, seq: int, logits_rows: int) -> float:
        return inference_peak(shapes, batch, seq, logits_rows)

    def train_peak(batch: int, seq: int, logit_rows: int) -> float:
        return training_peak(shapes, batch, seq, logit_rows)

    # 1a: hidden states of the corpus (one forward, no head), then basis and closed-form compressor
    doc_tokens = min(c_tokens := cfg.corpus.max_doc_tokens or 1000, 1000)  # fineweb-edu docs: ~1000 tokens
    corpus_tokens = cfg.corpus.num_documents * doc_tokens
    seq = min(cfg.corpus.max_tokens, c_tokens)
    state_bytes = FP16 if c.cache_dtype == "float16" else FP32
    flops = corpus_tokens * shapes.forward_flops_per_token(seq // 2, False)
    written = corpus_tokens * d * state_bytes + head_file
    out.append(StageCost("hiddens", corpus_tokens, flops, written, infer_peak(c.extract_batch_size, seq, 0)))
    train_tokens = corpus_tokens * (1 - cfg.corpus.heldout_fraction)
    flops = train_tokens * 2 * d * d + c.eval_lm_head_tokens * 4 * d * v
    peak = c.eval_lm_head_tokens * v * FP32 * 3
    out.append(StageCost("basis + compressor 1a", train_tokens, flops, d * d * 8 * 2, peak, note="float64 moments"))
    # datagen: generate think + answer (KV cache), one teacher-forced forward over prompt + trace
    n = dg.num_problems
    seq = prompt + think + answer
    decoded = n * (think + answer)
    flops = n * prompt * shapes.forward_flops_per_token(prompt // 2, False)
    flops += decoded * shapes.forward_flops_per_token(prompt + think // 2, True)
    flops += n * (prompt + think) * shapes.forward_flops_per_token((prompt + think) // 2, False)
    pair_bytes = n * (prompt + 1) * d * state_bytes
    batches = -(-n // dg.batch_size)
    out.append(StageCost("datagen", n * (prompt + think + answer) + n * (prompt + think), flops, pair_bytes,
                         infer_peak(dg.batch_size, seq, dg.batch_size), decode_steps=batches * (think + answer),
                         decode_bytes=weights + dg.batch_size * seq * shapes.kv_bytes_per_token() / 2))  # fmt: skip
    # trace-hiddens: a forward over prompt + trace, every state stored; 1b basis + SGD fine-tune (small)
    trace_tokens = n * (prompt + think)
    out.append(StageCost("trace-hiddens + 1b", trace_tokens,
                         trace_tokens * shapes.forward_flops_per_token((prompt + think) // 2, False)
                         + c.epochs * trace_tokens * 6 * d * c.d_prime,
                         trace_tokens * d * state_bytes,
                         infer_peak(c.extract_batch_size, prompt + think, 0)))  # fmt: skip
    pair_dtype = FP16 if cfg.pairs.dtype == "float16" else FP32
    out.append(StageCost("pairs", n * (prompt + 1), n * (prompt + 1) * 2 * d * c.d_prime,
                         n * (prompt + 1) * c.d_prime * pair_dtype, n * (prompt + 1) * d * FP32))  # fmt: skip
    t = cfg.trm
    trm_params = t.n_layers * (4 * c.d_prime**2 + 2 * t.expansion * c.d_prime**2)
    steps = t.t_recursions * (t.n_latent + 1) * t.n_supervision
    flops = 6 * trm_params * n * prompt * t.epochs * steps
    peak = t.batch_size * prompt * c.d_prime * FP32 * steps * 8
    out.append(StageCost("trm", n * prompt * t.epochs, flops, trm_params * FP32 * 4, peak, note="small next to the LM"))
    # latent: prompt states (no grad) + teacher-forced [prompt, k latents, answer] with grad through the LM
    seq = prompt + lat.num_latents + answer
    n_lat = lat.num_problems * lat.epochs + max(lat.batch_size, lat.num_problems // 4) * lat.epochs
    flops = n_lat * prompt * shapes.forward_flops_per_token(prompt // 2, False)
    flops += 3 * n_lat * seq * shapes.forward_flops_per_token(seq // 2, False) + 3 * n_lat * answer * 2 * d * v
    out.append(
        StageCost(
            "latent", n_lat * (prompt + seq), flops, 64e6, train_peak(lat.batch_size, seq, lat.batch_size * answer)
        )
    )
    # evaluate: five arms on num_problems test problems (think arm: prompt + think budget + answer)
    ne = ev.num_problems
    think_eval = ev.think_tokens or dg.max_new_tokens
    per_problem_decoded = 4 * ev.max_answer_tokens + think_eval + ev.max_answer_tokens
    flops = 5 * ne * prompt * shapes.forward_flops_per_token(prompt // 2, False)
    flops += ne * per_problem_decoded * shapes.forward_flops_per_token(prompt + think_eval // 2, True)
    seq = prompt + think_eval + ev.max_answer_tokens
    batches = -(-ne // ev.batch_size)
    for name in ("evaluate (before)", "evaluate (after)"):
        out.append(StageCost(name, ne * (5 * prompt + per_problem_decoded), flops, ne * 5 * 400,
                             infer_peak(ev.batch_size, seq, ev.batch_size),
                             decode_steps=batches * (think_eval + 4 * ev.max_answer_tokens),
                             decode_bytes=weights + ev.batch_size * seq * shapes.kv_bytes_per_token() / 2))  # fmt: skip
    # grpo: per step, sample G answers for q questions, then teacher-forced log-probs with grad (micro-batches)
    rows = gr.questions_per_step * gr.group_size
    seq = prompt + lat.num_latents + gr.max_completion_tokens
    per_step = rows * prompt * shapes.forward_flops_per_token(prompt // 2, False)
    per_step += (
        rows * gr.max_completion_tokens * shapes.forward_flops_per_token(prompt + gr.max_completion_tokens // 2, True)
    )
    per_step += gr.updates_per_rollout * 3 * rows * seq * shapes.forward_flops_per_token(seq // 2, False)
    per_step += gr.updates_per_rollout * 3 * rows * gr.max_completion_tokens * 2 * d * v
    if gr.beta > 0:
        per_step += rows * seq * shapes.forward_flops_per_token(seq // 2, True)
    checks = 2 * gr.eval_problems * (prompt + 32) * shapes.forward_flops_per_token(prompt, True) * 2
    from llm_trm_core.grpo.rollout import LOGIT_CHUNK

    peak = max(
        train_peak(gr.micro_batch, seq, gr.micro_batch * LOGIT_CHUNK),
        infer_peak(rows, seq, rows),
    )
    out.append(StageCost("grpo", gr.steps * rows * (prompt + 2 * seq), gr.steps * per_step + checks,
                         (gr.steps // gr.checkpoint_every + 1) * 3 * 64e6, peak,
                         decode_steps=gr.steps * gr.max_completion_tokens,
                         decode_bytes=weights + rows * seq * shapes.kv_bytes_per_token() / 2))  # fmt: skip
    for row in out:
        row.peak += CUDA_CONTEXT
    return out


def seconds_on(row: StageCost, card: tuple[float, float, float]) -> float:
    _, tflops, tbs = card
    compute = row.flops / (tflops * 1e12 * MFU)
    decode = row.decode_steps * row.decode_bytes / (tbs * 1e12)
    return compute + decode


def _human(value: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def table(cfg: PipelineConfig, shapes: Shapes) -> str:
    rows = estimate(cfg, shapes)
    names = list(CARDS)
    head = [
        "stage",
        "LM tokens",
        "FLOPs",
        "written",
        *[f"peak GPU, {n}" for n in names],
        *[f"hours, {n}" for n in names],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peaks = [f"{r.peak / GB:.1f} GB" + ("" if r.peak <= CARDS[n][0] * GB else " (does not fit)") for n in names]
        hours = [f"{seconds_on(r, CARDS[n]) / 3600:.2f}" for n in names]
        lines.append(
            f"| {r.stage} | {_human(r.tokens, '')} | {_human(r.flops, 'FLOP')} | {r.bytes_written / GB:.2f} GB | "
            + " | ".join(peaks + hours)
            + " |"
        )
    total_w = sum(r.bytes_written for r in rows)
    total_h = [f"{sum(seconds_on(r, CARDS[n]) for r in rows) / 3600:.1f}" for n in names]
    lines.append(
        f"| **total** | {_human(sum(r.tokens for r in rows), '')} | {_human(sum(r.flops for r in rows), 'FLOP')} | "
        f"{total_w / GB:.1f} GB | "
        + " | ".join(f"{max(r.peak for r in rows) / GB:.1f} GB (max)" for _ in names)
        + " | "
        + " | ".join(total_h)
        + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line per stage and card")
    parser.add_argument("--layers", type=int, default=SMOLLM3_3B["num_layers"])
    args = parser.parse_args(argv)
    cfg = load_config("smollm3-3b")
    shapes = model_shapes(args.layers)
    if args.json:
        for r in estimate(cfg, shapes):
            for name, card in CARDS.items():
                line: dict[str, Any] = {
                    "stage": r.stage, "card": name, "tokens": r.tokens, "flops": r.flops,
                    "bytes_written": r.bytes_written, "peak_gpu_bytes": r.peak, "fits": r.peak <= card[0] * GB,
                    "hours": seconds_on(r, card) / 3600, "estimate": True,
                }  # fmt: skip
                print(json.dumps(line))
        return
    print(
        f"SmolLM3-3B shapes: {shapes.layers} layers x {shapes.layer_params / 1e6:.1f} M + embedding "
        f"{shapes.embed_params / 1e6:.1f} M = {shapes.params / 1e9:.2f} B parameters; KV cache "
        f"{shapes.kv_bytes_per_token() / 1e3:.1f} kB/token (estimates; assumptions: {ASSUMED}, MFU {MFU})"
    )
    print(table(cfg, shapes))


if __name__ == "__main__":
    main()
