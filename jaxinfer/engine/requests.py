"""Request I/O shared by the engine and the baseline: outputs, prompt and sampling preparation,
and the stop rules, checked incrementally as tokens arrive.

Stop strings are matched on text decoded a few tokens at a time (the incremental detokenisation
of serving systems): each new token decodes only the tokens since the last complete character,
in the context of the token before them, so a long completion costs linear host work, and only
the tail that a new stop string occurrence could touch is searched. The same decoded text gives
the text of a streamed output (`StopChecker.stream_text`): it holds back a cut character and any
tail that could still grow into a stop string, so what a stream shows is never taken back.

Limits, one rule for every entry (Engine.add_request, .stream, .generate and ji.generate): the
context is the engine's max_seq_len (the baseline: the model's context). A prompt longer than it,
or max_tokens past it, raises ValueError naming the prompt (or field) and both lengths, before any
work; a prompt that fits but leaves fewer than max_tokens positions ends with finish_reason
"context" when no position is left (a prompt of L tokens gets at most context - L + 1 tokens: the
last one needs no position of its own).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from jaxinfer.models.config import ModelConfig
from jaxinfer.sampling import processors
from jaxinfer.sampling.params import SamplingParams
from jaxinfer.sampling.processors import Vocab
from jaxinfer.sampling.sampler import Logprob


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop token included)
    text: str | None  # decoded generated tokens, cut before a stop string; None without a tokenizer
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length" (max_tokens, or a request that
    # alone outgrew the KV cache) | "context" (no position left in the context: the prompt fit but left fewer
    # than max_tokens) | "aborted" (Engine.abort) | "timeout" (its deadline passed; tokens so far kept) |
    # "error" (non-finite logits while it ran; bad input raises ValueError instead) | None (running)
    # ttft_s, tpot_s, latency_s, prompt_tokens, generated_tokens, ...; times include compiling any program the
    # request is the first to need (Engine.warmup compiles them all first)
    metrics: dict[str, float]
    error: str | None = None  # why a request failed (finish_reason "error")
    request_id: int | None = None
    # False for a streamed output of a running request (Engine.step, Engine.stream): its tokens and text so
    # far, finish_reason None; the text holds back a tail that could still become a stop string
    finished: bool = True
    samples: list[RequestOutput] = dataclasses.field(default_factory=list)  # all n samples when n > 1
    logprobs: list[Logprob] | None = None  # one per generated token, when SamplingParams.logprobs asked
    # one per prompt token, when SamplingParams.prompt_logprobs asked: None for the first (nothing predicts it) and
    # for those before the request's prompt_logprobs_from (Engine.add_request), a Logprob for each other
    prompt_logprobs: list[Logprob | None] | None = None


def prepare_prompts(model, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Tokenize string prompts and check every prompt against the model's limits."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    return [prepare_prompt(model, p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def prepare_prompt(model, prompt: str | Sequence[int], name: str = "prompt") -> list[int]:
    """One prompt as token ids; ValueError naming `name` if it is empty, too long or off-vocabulary."""
    cfg: ModelConfig = model.config
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError(f"{name} is a string but the model has no tokenizer")
        if not prompt:
            raise ValueError(f"{name} is empty")
        ids = model.tokenizer.encode(prompt)
    else:
        arr = np.asarray(prompt) if isinstance(prompt, (list, tuple, np.ndarray, jax.Array)) else None
        if arr is None or arr.ndim != 1:
            raise ValueError(f"{name} is {type(prompt).__name__} {_short(prompt)}: pass a string or a list of token ids")
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"{name} holds {arr.dtype} values, not integer token ids: {_short(prompt)}")
        ids = arr.tolist()
    if not ids:
        raise ValueError(f"{name} is empty")
    if len(ids) > cfg.max_position_embeddings:
        raise ValueError(
            f"{name} has {len(ids)} tokens, over the model's context of {cfg.max_position_embeddings}"
        )
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"{name} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    return ids


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def check_request(model, prompt: str | Sequence[int], sampling: SamplingParams, max_seq_len: int, num_pages: int,
                  page_size: int, speculative: bool = False) -> list[int]:
    """The prompt's token ids, or ValueError for a request an engine could never run: sampling not
    SamplingParams, logits processing the model or
    speculative decoding cannot serve
    (processors.check), a bad prompt (prepare_prompt), the prompt past the context or the whole KV
    cache, or max_tokens past the context."""
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling is {type(sampling).__name__}, not SamplingParams")
    processors.check(sampling, Vocab.of(model), speculative)
    ids = prepare_prompt(model, prompt)
    if len(ids) > max_seq_len:
        raise ValueError(f"prompt has {len(ids)} tokens, over the engine's max_seq_len={max_seq_len}")
    if len(ids) > num_pages * page_size:
        raise ValueError(f"prompt has {len(ids)} tokens; the KV cache holds {num_pages * page_size} "
                         f"({num_pages} pages of {page_size}), it can never run")
    if sampling.max_tokens > max_seq_len:
        raise ValueError(f"max_tokens={sampling.max_tokens} is over the engine's max_seq_len={max_seq_len}")
    return ids


def prepare_sampling(
    sampling: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt, from one for all or a list of them."""
    if sampling is None:
        return [SamplingParams()] * n
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    if not isinstance(sampling, (list, tuple)):
        raise ValueError(f"sampling is a {type(sampling).__name__}: pass ji.SamplingParams(...) or a list of them, "
                         "one per prompt")
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {len(sampling)} SamplingParams for {n} prompts")
    for i, s in enumerate(sampling):
        if not isinstance(s, SamplingParams):
            raise ValueError(f"sampling[{i}] is {type(s).__name__}, not SamplingParams")
    return sampling


def prepare_adapters(adapters: Sequence[str | None] | None, n: int) -> list[str | None]:
    """One LoRA adapter name (or None: the base model) per prompt."""
    if adapters is None:
        return [None] * n
    if isinstance(adapters, str) or len(adapters) != n:
        raise ValueError(f"adapters must be a list of {n} adapter names or None, one per prompt")
    return list(adapters)


def sequence_output(prompt: list[int], seq, rules: StopRules, request_id: int | None = None) -> RequestOutput:
    """The output of one sequence (a jaxinfer.engine.scheduler.Sequence), finished or still running: its
    tokens, text and per-request timings (TTFT, TPOT, latency; so far, while it runs)."""
    k = len(seq.generated)
    finished = seq.finish_reason is not None
    first = seq.first_token_time or seq.finish_time or seq.arrival
    end = seq.finish_time or (time.perf_counter() if not finished and k else first)
    metrics = {"ttft_s": first - seq.arrival, "latency_s": end - seq.arrival,
               "tpot_s": (end - first) / (k - 1) if k > 1 else 0.0, "prompt_tokens": float(len(prompt)),
               "generated_tokens": float(k), "cached_tokens": float(seq.num_cached_tokens),
               "preemptions": float(seq.num_preemptions)}
    text = (None if not rules.text else rules.completion_text(seq.sampling, seq.generated) if finished
            else seq.stop.stream_text(seq.generated))
    return RequestOutput(prompt, seq.generated, text, seq.finish_reason, metrics, error=seq.error,
                         request_id=request_id, finished=finished,
                         logprobs=list(seq.logprobs) if seq.sampling.logprobs is not None else None,
                         prompt_logprobs=None if seq.prompt_logprobs is None else list(seq.prompt_logprobs))


def request_output(samples: list[RequestOutput], done: bool, n: int) -> RequestOutput:
    """A request's output from its samples' (in sample order): when done, the first with all n as
    `samples` (n > 1); while it runs, the one sample alone (n = 1), else the first's tokens so far
    with every sample's (finished False)."""
    if done:
        if len(samples) > 1:
            samples[0].samples = samples
        return samples[0]
    if len(samples) == 1 and n == 1:
        return samples[0]
    return dataclasses.replace(samples[0], finish_reason=None, error=None, finished=False, samples=samples)


class StopRules:
    """What ends a sequence for one model: its end-of-sequence ids (gathered once) and its
    tokenizer, for stop strings and the output text (text False: outputs carry token ids only, their
    text None, for a caller that decodes them itself)."""

    def __init__(self, model, text: bool = True):
        self.tokenizer = model.tokenizer
        self.eos_ids = Vocab.of(model).eos_ids
        self.text = text

    def checker(self, sampling: SamplingParams, room: int) -> StopChecker:
        """A fresh checker for one sequence with `room` positions left in its context for new tokens."""
        return StopChecker(self, sampling, room)

    def completion_text(self, sampling: SamplingParams, generated: Sequence[int]) -> str | None:
        """The decoded completion, cut before the first stop string; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(generated)
        hits = [text.index(s) for s in sampling.stop if s in text]
        return text[: min(hits)] if hits else text


class StopChecker:
    """Why one sequence ends after its newest token, checked once per token: "stop" for an EOS
    (unless ignored), a stop token or a stop string in the text, once min_tokens are generated;
    "length" once max_tokens are out;
    "context" once its `room` in the context is used up; else None. `budget` is the tokens it may
    generate at most. Holds the sequence's decoded text so far when it has stop strings."""

    def __init__(self, rules: StopRules, sampling: SamplingParams, room: int):
        self.rules, self.sampling, self.room = rules, sampling, room
        self.budget = min(sampling.max_tokens, room)
        self.text = ""  # decoded generated[:read]
        self._prefix = 0  # generated[prefix:read] are re-decoded as context for the next tokens
        self._read = 0
        self._longest = max((len(s) for s in sampling.stop), default=0)

    def __call__(self, generated: Sequence[int]) -> str | None:
        sp, tok = self.sampling, generated[-1]
        if len(generated) < sp.min_tokens:  # no stop before min_tokens (its stop tokens are banned)
            return "context" if len(generated) >= self.room else None
        if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in self.rules.eos_ids):
            return "stop"
        if sp.stop and self.rules.tokenizer is not None:
            new = self._new_text(generated)
            tail = self.text[-(len(new) + self._longest - 1):] if new else ""
            if any(s in tail for s in sp.stop):
                return "stop"
        if len(generated) >= sp.max_tokens:
            return "length"
        return "context" if len(generated) >= self.room else None

    def stream_text(self, generated: Sequence[int]) -> str | None:
        """The text of a running sequence so far: the decoded whole characters, less any tail that
        is the start of a stop string (it could still become one); None without a tokenizer."""
        if self.rules.tokenizer is None:
            return None
        if len(generated) > self._read:
            self._new_text(generated)
        text = self.text
        held = max((k for s in self.sampling.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - held]

    def _new_text(self, generated: Sequence[int]) -> str:
        """Text that the tokens since the last call add, once they end on a whole character."""
        decode = self.rules.tokenizer.decode
        before = decode(generated[self._prefix : self._read])
        full = decode(generated[self._prefix :])
        if len(full) <= len(before) or full.endswith("\ufffd"):  # nothing new, or a character cut short
            return ""
        new = full[len(before):]
        self.text += new
        self._prefix, self._read = self._read, len(generated)
        return new
