"""Thinking generation for a batch of problems, with consistent (pre, post) hidden states.

Per batch:
1. render the think-mode prompt (fixed system prompt) and tokenize it (no special tokens added: the
   template is complete);
2. generate the thinking span (left padding, seeded sampling or greedy, `max_new_tokens`), stopping
   at `</think>` or an answer marker;
3. cut the span (`spans.close_span`) and re-tokenize prompt + trace: these ids define the sample;
4. generate the answer after `</think>` (`max_answer_tokens`) and grade it. The prefill of that
   generate call is ONE teacher-forced forward over prompt + trace; a hook records the chosen
   layer there: `pre` = states of the prompt positions before `<think>`, `post` = the state AT the
   last token of `</think>`, the same position for every sample. Left padding does not change these
   states: generate derives position ids from the attention mask (each real token keeps its unpadded
   position) and padded keys are masked out (a test checks them against a forward of the sample alone).
Every problem yields one row, failures included.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from llm_trm_core.config import DatagenConfig
from llm_trm_core.data.answers import grade
from llm_trm_core.data.problems import Problem
from llm_trm_core.datagen.spans import close_span
from llm_trm_core.hidden_states import capture_layer
from llm_trm_core.lm import LoadedLM
from llm_trm_core.lm.prefix import reserved_cache
from llm_trm_core.lm.sampling import NucleusDraw
from llm_trm_core.lm.tokens import common_prefix_length, cut_at_eos, left_pad, shared_prompt_prefix, token_at

logger = logging.getLogger(__name__)


@dataclass
class PairStates:
    id: str
    split: str
    pre: torch.Tensor  # (think_start, D)
    post: torch.Tensor  # (D,)


def batch_seed(seed: int, first_index: int) -> int:
    """Sampling seed of the batch starting at a problem index: the same wherever the batch runs."""
    digest = hashlib.sha256(f"{seed}:{first_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


class ThinkingGenerator:
    def __init__(self, lm: LoadedLM, cfg: DatagenConfig, layer_index: int) -> None:
        self.lm = lm
        self.cfg = cfg
        self.layer_index = layer_index
        self.tokenizer = lm.tokenizer
        self.device = next(lm.model.parameters()).device
        self.native = lm.chat.thinking == "native"
        self.delims = lm.chat.delimiters
        self.context = int(getattr(lm.model.config, "max_position_embeddings", 1 << 30))
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.shared_prefix = shared_prompt_prefix(self.tokenizer, lm.chat, enable_thinking=True)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _sampling(self) -> dict[str, Any]:
        """Greedy, or the temperature / top-k / top-p draw as the last processor of a greedy `generate`
        (`llm_trm_core/lm/sampling.py`: the distribution of `generate`'s own sampling, without its full-vocabulary
        sort and `torch.multinomial`, 44 ms of each 16-row step on this CPU)."""
        cfg = self.cfg
        if cfg.temperature <= 0:
            return {"do_sample": False}
        draw = NucleusDraw(cfg.temperature, cfg.top_k, cfg.top_p)
        return {"do_sample": False, "logits_processor": LogitsProcessorList([draw])}

    @torch.no_grad()
    def _generate(
        self, sequences: list[list[int]], max_new_tokens: int, stop: list[str], capture: bool = False
    ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Left-padded batched generate: each row's new token ids and, with `capture`, the chosen layer's
        states of each row's input tokens (from the prefill forward)."""
        ids, mask = left_pad(sequences, self.pad_id)
        width = ids.shape[1]
        kwargs: dict[str, Any] = {}
        if stop:
            kwargs = {"stop_strings": stop, "tokenizer": self.tokenizer}
        model: Any = self.lm.model  # transformers types `generate` loosely
        hook: contextlib.AbstractContextManager[list[torch.Tensor]] = (
            capture_layer(model, self.layer_index) if capture else contextlib.nullcontext([])
        )
        with hook as captured:
            out = model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                past_key_values=reserved_cache(width + max_new_tokens),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                **self._sampling(),
                **kwargs,
            )
        new_ids = [row[width:].tolist() for row in out.cpu()]
        if not capture:
            return new_ids, None
        prefill = captured[0]  # (B, width, D): the first forward is the prefill over the whole input
        states = [prefill[row, width - len(seq) :].float().cpu() for row, seq in enumerate(sequences)]
        return new_ids, states

    def run_batch(self, items: list[tuple[int, Problem]], seed: int) -> tuple[list[dict[str, Any]], list[PairStates]]:
        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        for index, problem in items:
            prompt = self.lm.chat.prompt(problem.question, enable_thinking=True)
            enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            prompt_ids = list(enc.input_ids)
            if self.native:
                think_start = len(prompt_ids)
            else:
                think_start = token_at([tuple(o) for o in enc.offset_mapping], prompt.rfind(self.delims.start))
            rows.append(
                {
                    "problem_index": index,
                    "id": problem.id,
                    "split": problem.split,
                    "question": problem.question,
                    "gold_answer_text": problem.answer_text,
                    "gold_value": problem.answer_value,
                    "prompt": prompt,
                    "prompt_ids": prompt_ids,
                    "prompt_tokens": len(prompt_ids),
                    "system_prefix_len": common_prefix_length(prompt_ids, self.shared_prefix),
                    "think_start": think_start,
                    "generated_text": "",
                    "trace_ids": [],
                    "answer_text": "",
                    "answer_ids": [],
                    "think_end": None,
                    "think_tokens": None,
                    "end_source": None,
                    "extracted_answer": None,
                    "extract_method": None,
                    "correct": False,
                    "correct_strict": False,
                    "failure": None,
                }
            )
            if not problem.question.strip():
                rows[-1]["failure"] = "error: empty question"
            needed = len(prompt_ids) + cfg.max_new_tokens + cfg.max_answer_tokens + 2
            if needed > self.context:
                rows[-1]["failure"] = (
                    f"error: prompt of {len(prompt_ids)} tokens plus the thinking and answer budgets "
                    f"({cfg.max_new_tokens}+{cfg.max_answer_tokens}) exceeds the model's context of {self.context}"
                )

        live = [r for r in rows if r["failure"] is None]
        torch.manual_seed(batch_seed(seed, items[0][0]))
        if live:
            stop = [self.delims.end, *cfg.answer_markers]
            generated, _ = self._generate([r["prompt_ids"] for r in live], cfg.max_new_tokens, stop)
            for row, new_ids in zip(live, generated, strict=True):
                body, ended_by_eos = cut_at_eos(new_ids, self.eos_id)
                text = str(self.tokenizer.decode(body, skip_special_tokens=False))
                row["generated_text"] = text
                span = close_span(
                    text,
                    start=self.delims.start,
                    end=self.delims.end,
                    native=self.native,
                    ended_by_eos=ended_by_eos,
                    answer_markers=tuple(cfg.answer_markers),
                    close_on_eos=cfg.close_on_eos,
                    close_on_budget=cfg.close_on_budget,
                )
                if span.failure is not None or span.trace_text is None:
                    row["failure"] = span.failure
                    continue
                row["trace_ids"] = self._ids(span.trace_text)
                row["end_source"] = span.end_source
                row["think_end"] = len(row["prompt_ids"]) + len(row["trace_ids"]) - 1
                row["think_tokens"] = row["think_end"] - row["think_start"] + 1

        done = [r for r in rows if r["failure"] is None]
        pairs: list[PairStates] = []
        if done:
            sequences = [r["prompt_ids"] + r["trace_ids"] for r in done]
            answers, states = self._generate(sequences, cfg.max_answer_tokens, [], capture=True)
            assert states is not None
            for row, row_states in zip(done, states, strict=True):
                pre, post = row_states[: row["think_start"]], row_states[row["think_end"]]
                pairs.append(PairStates(row["id"], row["split"], pre, post))
            for row, new_ids in zip(done, answers, strict=True):
                body, _ = cut_at_eos(new_ids, self.eos_id)
                row["answer_ids"] = body
                row["answer_text"] = self.tokenizer.decode(body, skip_special_tokens=True)
                graded = grade(row["answer_text"], row["gold_value"])
                row["extracted_answer"] = graded.extracted.value
                row["extract_method"] = graded.extracted.method
                row["correct"] = graded.numeric
                row["correct_strict"] = graded.strict
        return rows, pairs
