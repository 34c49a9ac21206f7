"""Baseline generation over a contiguous KV cache.

The simplest correct serving loop, kept as the baseline the paged engine is compared against:
the whole batch is prefilled in one jitted call (right-padded prompts), then one jitted decode
step per token samples the next token for every row until each row has stopped. The cache
is donated into every step. Shapes are bucketed to powers of two (batch, prompt length,
cache length), so a run compiles one prefill and one decode program per bucket.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.engine.requests import RequestOutput, StopRules, prepare_prompts, prepare_sampling
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.kv_cache import KVCache
from jaxinfer.sampling import processors
from jaxinfer.sampling.params import SamplingParams
from jaxinfer.sampling.sampler import SamplingBatch, sample

# How many times each jitted step was traced (= compiled); tests assert on it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def _prefill(params, cfg, tokens, lengths, cache, sp, *, impl):
    TRACE_COUNTS["prefill"] += 1
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = model_lib.forward(params, cfg, tokens, positions, cache, (lengths - 1)[:, None], impl=impl)
    return sample(out.logits[:, 0], sp, jnp.zeros((B,), jnp.int32)), out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def _decode(params, cfg, tokens, positions, cache, sp, steps, *, impl):
    TRACE_COUNTS["decode"] += 1
    out = model_lib.forward(params, cfg, tokens[:, None], positions[:, None], cache, impl=impl)
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
    impl = model_lib.Impl(attn_impl, matmul_impl)
    prompt_ids = prepare_prompts(model, prompts)
    params_list = prepare_sampling(sampling, len(prompt_ids))
    if any(s.n > 1 for s in params_list):
        raise ValueError("n > 1 (parallel sampling) is served by ji.Engine, not the baseline generate")
    for i, s in enumerate(params_list):
        asked = [p.name for p in processors.asked(s)] + [name for name in ("logprobs", "prompt_logprobs")
                                                         if getattr(s, name) is not None]
        if asked:
            raise ValueError(f"sampling[{i}] asks for {', '.join(asked)}: served by ji.Engine, not the baseline "
                             f"generate (plain sampling only)")
        if s.max_tokens > cfg.max_position_embeddings:
            raise ValueError(f"sampling[{i}].max_tokens={s.max_tokens} is over the model's context of "
                             f"{cfg.max_position_embeddings}")
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
        model.params, cfg, jnp.asarray(tokens), jnp.asarray(row_lengths), cache, sp, impl=impl,
    )
    next_tok = np.asarray(next_tok)
    ttft = time.perf_counter() - start

    rules = StopRules(model)
    stops = [rules.checker(sp_i, cfg.max_position_embeddings - n + 1) for sp_i, n in zip(params_list, lengths)]
    generated: list[list[int]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    done_at = [0.0] * n
    step = 0
    while True:
        now = time.perf_counter() - start
        for i in range(n):
            if finish[i] is None:
                generated[i].append(int(next_tok[i]))
                finish[i] = stops[i](generated[i])
                done_at[i] = now
        if all(f is not None for f in finish):
            break
        step += 1
        positions = row_lengths + step - 1  # (B,) where this step's input token goes
        positions = np.minimum(positions, S - 1).astype(np.int32)
        steps = np.full((B,), step, np.int32)
        next_tok, cache = _decode(
            model.params, cfg, jnp.asarray(next_tok), jnp.asarray(positions), cache, sp,
            jnp.asarray(steps), impl=impl,
        )
        next_tok = np.asarray(next_tok)

    outputs = []
    for i in range(n):
        text = rules.completion_text(params_list[i], generated[i])
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
