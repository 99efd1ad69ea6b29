"""Putting the TRM back into the LM: k latent vectors injected as input embeddings before the answer.

    prompt (no-think template) -> LM states of the prompt -> compress -> TRM (all N_sup steps)
      -> projection to k vectors in the LM's input-embedding space
      -> inputs_embeds = [prompt embeddings, k latents] -> generate the answer (KV cache)

A last-layer state at one position can only change one next-token distribution (docs/original-llm-trm.md);
input embeddings at k positions are read by every later token through attention, so the answer can
use them. The original-style arm is kept for comparison: the decompressed TRM output replaces the
state after the end-of-thinking delimiter, which sets only the first answer token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import capture_layer
from llm_trm_core.lm import LoadedLM
from llm_trm_core.lm.prefix import PromptPrefix, generate_after, prefill, prefill_states
from llm_trm_core.lm.tokens import cut_at_eos, shared_prompt_prefix, token_at
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.models.trm import SequenceTRM

Arm = Literal["trm_latent", "random_latent", "mean_latent", "shuffled_latent", "no_latent"]
LATENT_ARMS: tuple[Arm, ...] = ("trm_latent", "random_latent", "mean_latent", "shuffled_latent")


class LatentProjector(nn.Module):
    """Standardized TRM output (D') -> k input embeddings (k, D) at the scale of the LM's embeddings."""

    def __init__(self, d_prime: int, hidden_size: int, k: int, embed_rms: float) -> None:
        super().__init__()
        self.d_prime, self.hidden_size, self.k = d_prime, hidden_size, k
        self.proj = nn.Linear(d_prime, k * hidden_size)
        nn.init.normal_(self.proj.weight, std=d_prime**-0.5)
        nn.init.zeros_(self.proj.bias)
        self.scale = nn.Parameter(torch.tensor(float(embed_rms)))

    @property
    def config(self) -> dict[str, Any]:
        rms = float(self.scale.detach())
        return {"d_prime": self.d_prime, "hidden_size": self.hidden_size, "k": self.k, "embed_rms": rms}

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        e = self.proj(c).view(c.shape[0], self.k, self.hidden_size)
        return e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


def embedding_rms(lm: LoadedLM) -> float:
    model: Any = lm.model
    weight = model.get_input_embeddings().weight
    return float(weight.detach().float().pow(2).mean().sqrt())


@dataclass
class PromptBatch:
    ids: list[list[int]]  # no-think prompt ids per question
    pre: torch.Tensor  # (B, L, D') compressed pre states, zero-padded
    mask: torch.Tensor  # (B, L)
    think_end: list[int]  # position of the prompt's last `</think>` token (the original arm's post position)
    prefix: PromptPrefix | None = None  # the prompts' KV cache, when encoding made it (no adapters loaded)


@dataclass
class TrmInputs:
    """The TRM's inputs for a list of questions: each one's compressed prompt states (L_i, D'), unpadded, in
    order. They depend only on the frozen LM, its layer and the compressor, so a TRM trained later (GRPO) is
    run on them without the LM running again (`LatentReasoner.outputs_from`)."""

    pieces: list[torch.Tensor]

    @classmethod
    def of(cls, batch: PromptBatch) -> TrmInputs:
        lengths = batch.mask.sum(1).long().tolist()
        return cls([batch.pre[row, :length].clone() for row, length in enumerate(lengths)])

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pre, mask) per `size` questions, zero-padded to the batch's longest as `encode_prompts` pads."""
        for start in range(0, len(self.pieces), size):
            yield padded_states(self.pieces[start : start + size])

    def to_bytes(self) -> bytes:
        lengths = torch.tensor([piece.shape[0] for piece in self.pieces], dtype=torch.long)
        return save_safetensors({"states": torch.cat(self.pieces).contiguous(), "lengths": lengths})

    @classmethod
    def from_bytes(cls, data: bytes) -> TrmInputs:
        tensors = load_safetensors(data)
        return cls(list(torch.split(tensors["states"], tensors["lengths"].tolist())))


def padded_states(pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed states of several questions as one zero-padded (B, L, D') batch and its (B, L) mask."""
    longest = max(max(p.shape[0] for p in pieces), 1)
    pre = torch.zeros(len(pieces), longest, pieces[0].shape[-1])
    mask = torch.zeros(len(pieces), longest)
    for row, piece in enumerate(pieces):
        pre[row, : piece.shape[0]] = piece
        mask[row, : piece.shape[0]] = 1
    return pre, mask


@dataclass
class LatentReasoner:
    lm: LoadedLM
    compressor: LinearCompressor
    trm: SequenceTRM
    projector: LatentProjector
    layer_index: int
    n_steps: int
    drop_system_prefix: bool = True
    mean_output: torch.Tensor | None = None  # (D',) the TRM's mean output over training questions (mean_latent)

    @property
    def device(self) -> torch.device:
        return next(self.lm.model.parameters()).device

    @functools.cached_property
    def shared_prefix(self) -> list[int]:
        """Token prefix common to every no-think prompt (the system block), computed once."""
        return shared_prompt_prefix(self.lm.tokenizer, self.lm.chat, enable_thinking=False)

    @torch.no_grad()
    def encode_prompts(self, questions: list[str]) -> PromptBatch:
        """No-think prompts and their compressed pre states (positions before `<think>`, as in training)."""
        tok = self.lm.tokenizer
        prefix = self.shared_prefix if self.drop_system_prefix else []
        ids, starts, ends = [], [], []
        for question in questions:
            prompt = self.lm.chat.prompt(question, enable_thinking=False)
            enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc.offset_mapping]
            start_char = prompt.rfind(self.lm.chat.delimiters.start)
            starts.append(token_at(offsets, start_char))
            end_char = prompt.rfind(self.lm.chat.delimiters.end) + len(self.lm.chat.delimiters.end) - 1
            ends.append(token_at(offsets, end_char))
            ids.append(list(enc.input_ids))
        model: Any = self.lm.model
        prompt_prefix: PromptPrefix | None = None
        if _adapters_loaded(model) or min(len(x) for x in ids) < 2:
            states = self._prompt_states(ids)
        else:  # one forward gives the TRM's input states and the prompts' KV cache (the same weights)
            prompt_prefix, captured = prefill_states(
                model, ids, int(tok.pad_token_id or 0), layer_index=self.layer_index
            )
            assert captured is not None
            left = captured.float().cpu()  # (B, width - 1, D), left-padded
            width = prompt_prefix.width
            states = [left[row, width - len(seq) : width - 1] for row, seq in enumerate(ids)]
        pieces = []
        for row, seq in enumerate(ids):
            keep_from = min(len(prefix), starts[row]) if seq[: len(prefix)] == prefix else 0
            pieces.append(self.compressor.compress(states[row][keep_from : starts[row]]))
        pre, mask = padded_states(pieces)
        return PromptBatch(ids, pre, mask, ends, prompt_prefix)

    def _prompt_states(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """The layer states of every prompt token, adapters off (right padding: real tokens keep their positions)."""
        tok = self.lm.tokenizer
        width = max(len(x) for x in ids)
        batch = torch.full((len(ids), width), int(tok.pad_token_id or 0), dtype=torch.long)
        attention = torch.zeros_like(batch)
        for row, seq in enumerate(ids):
            batch[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        with adapters_off(self.lm.model), capture_layer(self.lm.model, self.layer_index) as captured:
            self.lm.model.base_model(input_ids=batch.to(self.device), attention_mask=attention.to(self.device))
        states = captured[0].float().cpu()
        return [states[row, : len(seq)] for row, seq in enumerate(ids)]

    def check_context(self, batch: PromptBatch, new_tokens: int) -> None:
        """A question whose prompt, latents and answer budget exceed the model's context is an error."""
        context = int(getattr(self.lm.model.config, "max_position_embeddings", 1 << 30))
        longest = max(len(ids) for ids in batch.ids) + self.projector.k + new_tokens
        if longest > context:
            raise UserError(
                f"a question's prompt ({max(len(ids) for ids in batch.ids)} tokens) plus {self.projector.k} latents "
                f"and {new_tokens} answer tokens exceeds the model's context of {context} tokens; shorten the question"
            )

    def trm_output(self, batch: PromptBatch) -> torch.Tensor:
        """The TRM's prediction after all supervision steps, raw scale (B, D'). Differentiable if the TRM trains."""
        return self.trm_output_from(batch.pre, batch.mask)

    def trm_output_from(self, pre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`trm_output` of compressed prompt states `pre` (B, L, D') with their mask (B, L)."""
        prepared = self.trm.prepare(pre.to(self.device), mask.to(self.device))
        carry = self.trm.initial_carry(prepared)
        prediction = carry.y[:, -1]
        for _ in range(self.n_steps):
            carry, prediction, _ = self.trm.supervision_step(prepared, carry)
            carry = carry.detach()
        return self.trm.denormalize(prediction)

    def latents(
        self,
        batch: PromptBatch,
        arm: Arm,
        generator: torch.Generator | None = None,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The k latents of an arm for `batch` (the TRM runs on it unless the arm needs no TRM output);
        `outputs`: other questions' TRM outputs for shuffled_latent. See `arm_latents`."""
        if arm == "no_latent":
            return None
        if arm in ("trm_latent", "random_latent"):
            return self.arm_latents(arm, len(batch.ids), self.trm_output(batch), generator)
        return self.arm_latents(arm, len(batch.ids), outputs, generator)

    def arm_latents(
        self,
        arm: Arm,
        rows: int,
        outputs: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | None:
        """The k latents of an arm from TRM outputs (raw scale, (rows, D')). Controls with the TRM latents'
        capacity (docs/evaluation.md): random_latent: random directions with each real latent's norm
        (`outputs`: the questions' own TRM outputs); mean_latent: the projector applied to `mean_output` (one
        vector for every question); shuffled_latent: `outputs` are other questions' TRM outputs (see
        `outputs_from` and `stats.derangement`)."""
        if arm == "no_latent":
            return None
        if arm == "mean_latent":
            if self.mean_output is None:
                raise UserError("the mean_latent arm needs the TRM's training-mean output (fit_mean_output)")
            outputs = self.mean_output.expand(rows, -1)
        if outputs is None or outputs.shape[0] != rows:
            permuted = "permuted " if arm == "shuffled_latent" else ""
            raise ValueError(f"the {arm} arm needs one {permuted}TRM output per question")
        latents = self.projector(self.trm.standardize_target(outputs.to(self.device)))
        if arm == "random_latent":  # same k, random directions with the norm of each real latent
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            latents = noise / noise.norm(dim=-1, keepdim=True) * latents.norm(dim=-1, keepdim=True)
        return latents

    @torch.no_grad()
    def trm_outputs_of(self, batches: Iterable[PromptBatch]) -> torch.Tensor:
        """(N, D') TRM outputs of encoded batches, in order (raw scale, CPU)."""
        parts = [self.trm_output(batch).float().cpu() for batch in batches]
        return torch.cat(parts) if parts else torch.zeros(0, self.compressor.d_prime)

    @torch.no_grad()
    def trm_inputs(self, questions: list[str], batch_size: int) -> TrmInputs:
        """The TRM inputs of many questions, encoded `batch_size` at a time (their prompt caches are dropped)."""
        pieces = []
        for start in range(0, len(questions), batch_size):
            pieces += TrmInputs.of(self.encode_prompts(questions[start : start + batch_size])).pieces
        return TrmInputs(pieces)

    @torch.no_grad()
    def outputs_from(self, inputs: TrmInputs, batch_size: int) -> torch.Tensor:
        """(N, D') TRM outputs of kept TRM inputs, `batch_size` questions at a time (raw scale, CPU)."""
        parts = [self.trm_output_from(pre, mask).float().cpu() for pre, mask in inputs.batches(batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.compressor.d_prime)

    def fit_mean_output(self, questions: list[str], batch_size: int) -> torch.Tensor:
        """Set (and return) `mean_output`: the mean TRM output over these (training) questions."""
        return self.fit_mean_output_from(self.trm_inputs(questions, batch_size), batch_size)

    def fit_mean_output_from(self, inputs: TrmInputs, batch_size: int) -> torch.Tensor:
        """`fit_mean_output` from the questions' kept TRM inputs: the TRM runs, the LM does not."""
        self.mean_output = self.outputs_from(inputs, batch_size).mean(0)
        return self.mean_output

    def input_embeddings(
        self, ids: list[list[int]], latents: torch.Tensor | None, answers: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded [prompt, latents, answer] embeddings and attention mask; returns each row's answer start."""
        embed = self.lm.model.get_input_embeddings()
        rows, starts = [], []
        for row, seq in enumerate(ids):
            parts = [embed(torch.tensor(seq, device=self.device))]
            if latents is not None:
                parts.append(latents[row].to(parts[0].dtype))
            if answers is not None:
                parts.append(embed(torch.tensor(answers[row], device=self.device, dtype=torch.long)))
            rows.append(torch.cat(parts))
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[-1]
        embeds = rows[0].new_zeros(len(rows), width, hidden)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        k = 0 if latents is None else latents.shape[1]
        for row, (seq, emb) in enumerate(zip(ids, rows, strict=True)):
            embeds[row, width - emb.shape[0] :] = emb
            mask[row, width - emb.shape[0] :] = 1
            starts.append(width - emb.shape[0] + len(seq) + k)
        return embeds, mask, starts

    def prefix(self, ids: list[list[int]], grad: bool = False) -> PromptPrefix:
        """The prompts run once through the LM under the current adapter state (llm_trm_core/lm/prefix.py)."""
        return prefill(self.lm.model, ids, int(self.lm.tokenizer.pad_token_id or 0), grad)

    def prompt_prefix(self, batch: PromptBatch, grad: bool = False) -> PromptPrefix:
        """`batch`'s KV cache: the one encoding made when it is valid here (no adapters, no gradients needed
        through the prompt), else a new prefill."""
        adapters = _adapters_loaded(self.lm.model)
        if batch.prefix is not None and not adapters and not (grad and torch.is_grad_enabled()):
            return batch.prefix
        return self.prefix(batch.ids, grad)

    @torch.no_grad()
    def generate_arms(
        self,
        batch: PromptBatch,
        latents: Mapping[str, torch.Tensor | None],
        max_new_tokens: int,
        lm_only: Collection[str] = (),
    ) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
        """Greedy answers (token ids, EOS cut) of several arms on the same prompts, and the seconds each arm
        took per question. The prompts run through the LM once (per adapter state: arms in `lm_only` run
        with adapters off); the arms with latents then decode together from that cache, as one batch of
        arms x questions, and the arms without latents together (their wall time is shared equally)."""
        self.check_context(batch, max_new_tokens)
        model: Any = self.lm.model
        tok = self.lm.tokenizer
        groups: dict[tuple[bool, bool], list[str]] = {}
        for arm, value in latents.items():
            groups.setdefault((arm in lm_only, value is not None), []).append(arm)
        adapters = _adapters_loaded(model)
        prefixes: dict[bool, PromptPrefix] = {}
        answers: dict[str, list[list[int]]] = {}
        seconds: dict[str, float] = {}
        rows = len(batch.ids)
        for (off, injected), arms in groups.items():
            began = time.perf_counter()
            with adapters_off(model) if off else nullcontext():
                state = off and adapters
                if state not in prefixes:
                    prefixes[state] = self.prompt_prefix(batch)
                prefix = prefixes[state].select([i for i in range(rows) for _ in arms])
                middle = None
                if injected:
                    stacked = torch.stack([latents[arm] for arm in arms], dim=1)  # type: ignore[misc]
                    middle = stacked.flatten(0, 1)  # row i * len(arms) + a: question i, arm a
                out = generate_after(
                    model, prefix, middle, max_new_tokens, int(tok.eos_token_id), int(tok.pad_token_id or 0)
                ).cpu()
            for a, arm in enumerate(arms):
                answers[arm] = [cut_at_eos(out[i * len(arms) + a].tolist(), tok.eos_token_id)[0] for i in range(rows)]
                seconds[arm] = (time.perf_counter() - began) / (rows * len(arms))
        return {arm: answers[arm] for arm in latents}, seconds

    def generate(
        self,
        questions: list[str],
        arm: Arm,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        outputs: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Greedy answers (token ids, EOS cut) with the arm's latents injected before the answer."""
        batch = self.encode_prompts(questions)
        with torch.no_grad():
            latents = self.latents(batch, arm, generator, outputs)
        return self.generate_arms(batch, {arm: latents}, max_new_tokens)[0][arm]

    @torch.no_grad()
    def generate_original_style(
        self, batch: PromptBatch, max_new_tokens: int, outputs: torch.Tensor | None = None
    ) -> list[list[int]]:
        """The original's arm: the decompressed TRM output (`outputs`, else the TRM runs on `batch`) replaces
        the state AT `</think>` (`think_end`, the position the pairs' post state was taken at), so the LM head
        of it picks the token that follows `</think>`; the answer is then generated from the prompt cut after
        `</think>` plus that token (all questions decoded together; the prompt's cache is the batch's own
        when the no-think prompt ends one token after `</think>`). The original method has a
        frozen LM, so LoRA adapters are off here as in the LM-only arms."""
        self.check_context(batch, max_new_tokens)
        out = self.trm_output(batch) if outputs is None else outputs
        with adapters_off(self.lm.model):
            return self._original_style_answers(batch, max_new_tokens, out)

    def _original_style_answers(self, batch: PromptBatch, max_new_tokens: int, out: torch.Tensor) -> list[list[int]]:
        post = self.compressor.decompress(out.float().cpu())
        head = self.lm.model.get_output_embeddings()
        first = head(post.to(self.device).to(head.weight.dtype)).argmax(-1).tolist()
        tok = self.lm.tokenizer
        answers: list[list[int]] = [[] for _ in batch.ids]
        todo = [row for row, token in enumerate(first) if token != tok.eos_token_id]
        if not todo:
            return answers
        if max_new_tokens <= 1:
            return [[] if token == tok.eos_token_id else [token] for token in first]
        model: Any = self.lm.model
        eos, pad = int(tok.eos_token_id), int(tok.pad_token_id or 0)
        if all(end == len(ids) - 2 for ids, end in zip(batch.ids, batch.think_end, strict=True)):
            # the no-think prompt's cache (every token but its last) is the prompt through `</think>`: continue
            # it with the chosen token in place of the prompt's last one, without running the prompt again
            cached = batch.prefix if batch.prefix is not None and not _adapters_loaded(model) else None
            prefix = (cached or self.prefix(batch.ids)).select(todo)
            first_ids = torch.tensor([[first[row]] for row in todo], device=self.device)
            prefix = dataclasses.replace(
                prefix, ids=[[*batch.ids[row][:-1], first[row]] for row in todo],
                last=model.get_input_embeddings()(first_ids).to(prefix.last.dtype),
            )  # fmt: skip
        else:
            prefix = self.prefix([[*batch.ids[row][: batch.think_end[row] + 1], first[row]] for row in todo])
        generated = generate_after(model, prefix, None, max_new_tokens - 1, eos, pad).cpu()
        for j, row in enumerate(todo):
            answers[row] = [first[row], *cut_at_eos(generated[j].tolist(), eos)[0]]
        return answers


def _adapters_loaded(model: Any) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


@contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The TRM's inputs are the states of the LM without LoRA: adapters are off while encoding prompts."""
    if not _adapters_loaded(model):
        yield
        return
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()
