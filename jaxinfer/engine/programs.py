"""The jitted programs a model runner runs, each over the paged cache, donated in and returned.

  mixed_step    one mixed step (decode tokens and prompt chunks), each logits row sampled
  multi_decode  k decode steps in one program, each sampled token fed to the next step
  decode_logits, draw   one decode step as two programs, the forward pass and the draw: the rows'
                sampling arrays are filled in between, while the device computes the logits
                (logits processors filled late: jaxinfer.sampling.processors.Processor.late)
  verify        one pass over each row's token and its drafts, then the acceptance rule
  sample_rows   more samples from rows of a step's logits (the other samples of n > 1 sampling)
Sampled tokens come back as jaxinfer.sampling.Sampled (tokens, and log-probabilities when asked);
a mixed step whose inputs ask for prompt log-probabilities returns them too.
  newest        each row's newest token of a multi-step call (the next call's input, on device)
  copy_features, clear_pages   copy-on-write of the feature cache; zeroing pages a failed row wrote
Inputs are the named structures of jaxinfer/engine/batch.py. Every program counts its traces in
TRACE_COUNTS, so tests can assert how many programs a run compiled.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxinfer import lora as lora_lib
from jaxinfer.engine.batch import DecodeInputs, MixedInputs, PromptTargets, VerifyInputs
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.kv_cache import BatchDescriptor, copy_slots
from jaxinfer.sampling.sampler import NONFINITE, TokenLogprobs, sample_checked, target_logprobs
from jaxinfer.speculative import tree as tree_lib
from jaxinfer.speculative.accept import accept, accept_synthetic, accept_tree
from pallas_kernels.common import pack_tree_mask

# How many times each jitted program was traced (= compiled); tests assert on it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def _store(features, batch: BatchDescriptor, out: model_lib.ForwardOutput):
    """The feature cache with every token's features written at its slot: its final-norm hidden
    state (N, D), then the hidden states entering each requested layer (out.aux (A, N, D)): (N, (1 + A) * D)."""
    if features is None:
        return None
    rows = out.hidden if out.aux is None else jnp.concatenate([out.hidden[None], out.aux], axis=0)
    rows = rows if out.aux is None else jnp.moveaxis(rows, 0, 1).reshape(rows.shape[1], -1)
    return features.at[batch.slot_mapping].set(rows.astype(features.dtype), mode="drop")


def _with_adapters(params, lora, lora_batch, impl, lora_impl):
    """The params and projection hook of a step: with LoRA slots, each token's delta is added."""
    if lora is None:
        return params, None
    return lora_lib.with_adapters(params, lora, lora_batch, impl, lora_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "lora_impl", "feature_layers"),
                   donate_argnames=("cache", "features"))
def mixed_step(params, cfg, x: MixedInputs, cache, features, lora=None, *, impl, lora_impl="xla", feature_layers=()):
    """-> a token sampled from each of the R logits rows at x.batch.logits_at (Sampled: NONFINITE
    where its logits are not finite; log-probabilities when x.sampling asks), their logits (R, V)
    and hidden states (R, D), the cache, the feature cache (None: none kept; feature_layers: the
    layers whose inputs it keeps too) and, when x.prompt asks, the prompt log-probabilities of the
    prompt chunks' tokens (TokenLogprobs of shapes (Rp, C), (Rp, C, top_n); else None). lora: the
    adapter slots (jaxinfer.lora.LoraWeights) or None. A step without x.prompt traces the program
    it traced before prompt log-probabilities existed (counted as "step"; the others as "prompt_step")."""
    TRACE_COUNTS["step" if x.prompt is None else "prompt_step"] += 1
    batch = x.batch
    params, project = _with_adapters(params, lora, lora_lib.LoraBatch.from_descriptor(batch), impl, lora_impl)
    all_hidden = features is not None or x.prompt is not None
    out = model_lib.forward_paged(params, cfg, x.tokens, cache, batch, impl=impl, all_hidden=all_hidden,
                                  project=project, aux_layers=feature_layers)
    hidden = out.hidden[batch.logits_at] if all_hidden else out.hidden
    prompt = None if x.prompt is None else _prompt_logprobs(params, cfg, out.hidden, x.prompt)
    return (sample_checked(out.logits, x.sampling, x.steps), out.logits, hidden, out.cache,
            _store(features, batch, out), prompt)


def _prompt_logprobs(params, cfg, hidden, prompt: PromptTargets) -> TokenLogprobs:
    """The raw log-probabilities of the prompt chunks' targets (Rp, C) from the final-norm hidden
    states of every token of the step (N, D), the chunks last: one chunk's logits (C, V) at a time,
    so the step holds no (Rp * C, V) array."""
    Rp, C = prompt.targets.shape
    chunks = hidden[hidden.shape[0] - Rp * C :].reshape(Rp, C, -1)  # (Rp, C, D)

    def one(xs):
        h, targets = xs
        return target_logprobs(model_lib.lm_head(params, cfg, h), targets, prompt.top_n)

    return jax.lax.map(one, (chunks, prompt.targets))


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "synthetic", "lora_impl", "feature_layers"),
                   donate_argnames=("cache", "features"))
def verify(params, cfg, x: VerifyInputs, drafts, cache, features, lora=None, parents=None, *, impl, synthetic,
           lora_impl="xla", feature_layers=()):
    """One target pass over rows [last, d_1, .., d_k] and the acceptance rule -> accepted (R,),
    Sampled with tokens (R, k + 1) (and their log-probabilities when x.sampling asks), the cache
    and the feature cache. drafts (R, k).
    synthetic: None, or the probability a synthetic drafter's token is accepted (not lossless).
    parents (R, k): the drafts are a tree (jaxinfer.speculative.tree): positions by depth, attention
    by ancestry, the tree rule, and the accepted path's K/V and features compacted into place.
    A row whose logits are not finite at a position j <= accepted stops there: accepted becomes j
    and tokens[j] NONFINITE (a tree: any non-finite node stops the row at its first token)."""
    TRACE_COUNTS["verify"] += 1
    R, k = drafts.shape
    batch, sp, steps = x.batch, x.sampling, x.steps
    tokens = jnp.concatenate([x.last[:, None], drafts], axis=1).reshape(-1)  # (R * (k + 1),)
    if parents is not None:
        visible, depth = tree_lib.ancestry(parents, x.num_drafts)
        batch = batch.replace(positions=(batch.prefill_start[:, None] + depth).reshape(-1),
                              prefill_tree_mask=pack_tree_mask(visible))
    params, project = _with_adapters(params, lora, lora_lib.LoraBatch.from_descriptor(batch), impl, lora_impl)
    out = model_lib.forward_paged(params, cfg, tokens, cache, batch, impl=impl, all_hidden=features is not None,
                                  project=project, aux_layers=feature_layers)
    logits = out.logits.reshape(R, k + 1, -1)
    cache, features = out.cache, _store(features, batch, out)
    if parents is not None:
        accepted, emitted, path = accept_tree(logits, drafts, parents, x.num_drafts, sp, steps)
        dropped = cache.num_pages * cache.page_size
        src, dst = tree_lib.compaction(batch.slot_mapping.reshape(R, k + 1), path, accepted, dropped)
        cache = copy_slots(cache, src, dst)
        if features is not None:
            features = features.at[dst].set(features.at[src].get(mode="clip"), mode="drop")
    elif synthetic is None:
        accepted, emitted = accept(logits, drafts, x.num_drafts, sp, steps)
    else:
        accepted, emitted = accept_synthetic(logits, x.num_drafts, sp, steps, synthetic)
    position = jnp.arange(k + 1)[None, :]
    ok = jnp.all(jnp.isfinite(logits), axis=-1) | (position > x.num_drafts[:, None])  # (R, k + 1); padding is ok
    first_bad = jnp.where(jnp.all(ok, axis=1), k + 1, 0 if parents is not None else jnp.argmin(ok, axis=1))  # (R,)
    accepted = jnp.minimum(accepted, first_bad)
    emitted = dataclasses.replace(emitted, tokens=jnp.where(position == first_bad[:, None], NONFINITE, emitted.tokens))
    return accepted, emitted, cache, features


def _decode_forward(params, cfg, x: DecodeInputs, lora, impl, lora_impl):
    """fn(tokens (R,), cache, j) -> ForwardOutput: decode step j of a call's rows (a row writes K/V
    only while j < x.valid[r]), under the rows' LoRA adapters."""
    params, project = _with_adapters(params, lora, lora_lib.LoraBatch(x.adapter_ids, x.adapter_ids[:0]), impl,
                                     lora_impl)

    def forward(tokens, cache, j):
        batch = BatchDescriptor.decode_rows(x.positions + j, j < x.valid, x.block_tables, cache.page_size,
                                            cache.num_pages * cache.page_size, x.adapter_ids)
        return model_lib.forward_paged(params, cfg, tokens, cache, batch, impl=impl, project=project)

    return forward


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "num_steps", "lora_impl"), donate_argnames=("cache",))
def multi_decode(params, cfg, x: DecodeInputs, cache, lora=None, *, impl, num_steps, lora_impl="xla"):
    """num_steps decode steps in one program, each sampled token fed to the next step (and, when the
    rows have logits processors, handed to them as drawn in the call); a row writes K/V only in its
    first x.valid[r] steps. Returns Sampled with tokens (num_steps, R) (NONFINITE where a row's
    logits are not finite) and the cache."""
    TRACE_COUNTS["multi_decode"] += 1
    forward = _decode_forward(params, cfg, x, lora, impl, lora_impl)

    def one(carry, j):
        tokens, drawn, cache = carry
        out = forward(tokens, cache, j)
        new = sample_checked(out.logits, x.sampling, x.steps + j, drawn)
        if drawn is not None:
            drawn = drawn.at[:, j].set(new.tokens)
        return (jnp.maximum(new.tokens, 0), drawn, out.cache), new  # a failed row runs on, on token 0 (it is failed)

    drawn = None if x.sampling.processors is None else jnp.full((x.tokens.shape[0], num_steps), -1, jnp.int32)
    (_, _, cache), new = jax.lax.scan(one, (x.tokens, drawn, cache), jnp.arange(num_steps))
    return new, cache


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "lora_impl"), donate_argnames=("cache",))
def decode_logits(params, cfg, x: DecodeInputs, cache, lora=None, *, impl, lora_impl="xla"):
    """multi_decode's first step without its draw (x.sampling is not read): the logits (R, V) and
    the cache. `draw` samples them once the rows' sampling arrays are filled."""
    TRACE_COUNTS["decode_logits"] += 1
    out = _decode_forward(params, cfg, x, lora, impl, lora_impl)(x.tokens, cache, 0)
    return out.logits, out.cache


@jax.jit
def draw(logits, sp, steps):
    """A decode step's draw from its logits (R, V) -> Sampled with tokens (1, R), as multi_decode
    returns a one-step call's."""
    TRACE_COUNTS["draw"] += 1
    return sample_checked(logits, sp, steps).reshape(1, logits.shape[0])


@functools.partial(jax.jit, static_argnames="page_size", donate_argnames="features")
def copy_features(features, src, dst, *, page_size):
    """The feature cache with whole pages src[i] copied to dst[i]."""
    offsets = jnp.arange(page_size)
    return features.at[(dst[:, None] * page_size + offsets).reshape(-1)].set(
        features[(src[:, None] * page_size + offsets).reshape(-1)])


@jax.jit
def newest(tokens, last):
    """tokens (k, R), last (R,) -> tokens[last[r], r]: each row's newest sampled token."""
    return jnp.take_along_axis(tokens, last[None], axis=0)[0]


@jax.jit
def sample_rows(logits, rows, sp, steps):
    """More samples from given rows of a step's logits (the other n - 1 samples of a prompt)."""
    TRACE_COUNTS["sample"] += 1
    return sample_checked(logits[rows], sp, steps)


@functools.partial(jax.jit, donate_argnames=("cache", "features"))
def clear_pages(cache, features, pages):
    """The cache (and feature cache) with pages (n,) zeroed; indices past the cache are ignored."""
    TRACE_COUNTS["clear"] += 1
    cache = jax.tree.map(lambda x: x.at[:, :, pages].set(0, mode="drop"), cache)
    if features is None:
        return cache, None
    page_size = cache.page_size
    slots = (pages[:, None] * page_size + jnp.arange(page_size)).reshape(-1)
    return cache, features.at[slots].set(0, mode="drop")
