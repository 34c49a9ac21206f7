"""Baseline generation over a contiguous KV cache.

The simplest correct serving loop, kept as the baseline the paged engine is compared against:
the whole batch is prefilled in one jitted call (right-padded prompts), then one jitted decode
step per token samples the next token for every row until each row has stopped. The cache
is donated into every step. Shapes are bucketed to powers of two (batch, prompt length,
cache length), so a run compiles one prefill and one decode program per bucket.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as model_lib
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache
from jaxinfer.sampling import SamplingBatch, SamplingParams, sample


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop token included)
    text: str | None  # decoded generated tokens, cut before a stop string; None without a tokenizer
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length" | "error"
    metrics: dict[str, float]  # ttft_s, tpot_s, latency_s, prompt_tokens, generated_tokens, ...
    error: str | None = None  # why a request was refused (finish_reason "error")
    request_id: int | None = None
    samples: list[RequestOutput] = dataclasses.field(default_factory=list)  # all n samples when n > 1


def eos_ids(model) -> set[int]:
    """End-of-sequence ids from the model's config and its tokenizer."""
    return set(model.config.eos_token_ids) | set(model.tokenizer.eos_ids if model.tokenizer else ())


def stop_reason(model, sp: SamplingParams, generated: Sequence[int], budget: int) -> str | None:
    """Why a sequence ends after its newest token generated[-1], or None: "stop" for an EOS (unless
    ignored), a stop token or a stop string in the text; "length" once `budget` tokens are out."""
    tok = generated[-1]
    if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in eos_ids(model)):
        return "stop"
    if sp.stop and model.tokenizer is not None:
        text = model.tokenizer.decode(generated)
        if any(s in text for s in sp.stop):
            return "stop"
    return "length" if len(generated) >= budget else None


def completion_text(model, sp: SamplingParams, generated: Sequence[int]) -> str | None:
    """The decoded completion, cut before the first stop string; None without a tokenizer."""
    if model.tokenizer is None:
        return None
    text = model.tokenizer.decode(generated)
    hits = [text.index(s) for s in sp.stop if s in text]
    return text[: min(hits)] if hits else text


def next_power_of_2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


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
        ids = [int(t) for t in prompt]
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


def prepare_sampling(
    sampling: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if sampling is None:
        return [SamplingParams()] * n
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise ValueError(f"got {len(sampling)} SamplingParams for {n} prompts")
    for i, s in enumerate(sampling):
        if not isinstance(s, SamplingParams):
            raise ValueError(f"sampling[{i}] is {type(s).__name__}, not SamplingParams")
    return sampling


# How many times each jitted step was traced (= compiled); tests assert on it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "matmul_impl"), donate_argnames=("cache",))
def _prefill(params, cfg, tokens, lengths, cache, sp, *, attn_impl, matmul_impl):
    TRACE_COUNTS["prefill"] += 1
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = model_lib.forward(params, cfg, tokens, positions, cache, (lengths - 1)[:, None], attn_impl=attn_impl,
                            matmul_impl=matmul_impl)
    return sample(out.logits[:, 0], sp, jnp.zeros((B,), jnp.int32)), out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "matmul_impl"), donate_argnames=("cache",))
def _decode(params, cfg, tokens, positions, cache, sp, steps, *, attn_impl, matmul_impl):
    TRACE_COUNTS["decode"] += 1
    out = model_lib.forward(params, cfg, tokens[:, None], positions[:, None], cache, attn_impl=attn_impl,
                            matmul_impl=matmul_impl)
    return sample(out.logits[:, 0], sp, steps), out.cache


def generate(
    model,
    prompts: Sequence[str | Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    attn_impl: str = "xla",
    matmul_impl: str = "xla",
) -> list[RequestOutput]:
    """Generate a completion for each prompt; outputs come back in prompt order."""
    cfg: ModelConfig = model.config
    prompt_ids = prepare_prompts(model, prompts)
    params_list = prepare_sampling(sampling, len(prompt_ids))
    if any(s.n > 1 for s in params_list):
        raise ValueError("n > 1 (parallel sampling) is served by ji.Engine, not the baseline generate")
    start = time.perf_counter()

    n = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    # A row stops at its max_tokens or at the end of the model's context.
    budgets = np.minimum([s.max_tokens for s in params_list], cfg.max_position_embeddings - lengths + 1)
    B = next_power_of_2(n)
    T = next_power_of_2(int(lengths.max()), 16)
    S = min(next_power_of_2(int((lengths + budgets).max()), 16), cfg.max_position_embeddings)
    S = max(S, min(T, cfg.max_position_embeddings))

    tokens = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, : len(p)] = p
    row_lengths = np.ones((B,), np.int32)
    row_lengths[:n] = lengths
    seeds = [s.seed if s.seed is not None else i for i, s in enumerate(params_list)]
    padded = params_list + [SamplingParams(temperature=0.0)] * (B - n)
    sp = SamplingBatch.from_params(padded, seeds + [0] * (B - n))
    cache = KVCache.zeros(cfg, B, S, model.dtype)

    next_tok, cache = _prefill(
        model.params, cfg, jnp.asarray(tokens), jnp.asarray(row_lengths), cache, sp, attn_impl=attn_impl,
        matmul_impl=matmul_impl,
    )
    next_tok = np.asarray(next_tok)
    ttft = time.perf_counter() - start

    generated: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    done_at = [0.0] * n
    step = 0
    while True:
        now = time.perf_counter() - start
        for i in range(n):
            if finish[i] is None:
                generated[i].append(int(next_tok[i]))
                finish[i] = stop_reason(model, params_list[i], generated[i], budgets[i])
                done_at[i] = now
        if all(f is not None for f in finish):
            break
        step += 1
        positions = row_lengths + step - 1  # (B,) where this step's input token goes
        positions = np.minimum(positions, S - 1).astype(np.int32)
        steps = np.full((B,), step, np.int32)
        next_tok, cache = _decode(
            model.params, cfg, jnp.asarray(next_tok), jnp.asarray(positions), cache, sp,
            jnp.asarray(steps), attn_impl=attn_impl, matmul_impl=matmul_impl,
        )
        next_tok = np.asarray(next_tok)

    outputs = []
    for i in range(n):
        text = completion_text(model, params_list[i], generated[i])
        k = len(generated[i])
        metrics = {
            "ttft_s": ttft,
            "latency_s": done_at[i],
            "tpot_s": (done_at[i] - ttft) / (k - 1) if k > 1 else 0.0,
            "prompt_tokens": float(len(prompt_ids[i])),
            "generated_tokens": float(k),
        }
        outputs.append(RequestOutput(prompt_ids[i], generated[i], text, finish[i], metrics))
    return outputs
