"""Feature-level drafting (EAGLE, EAGLE-3): a one-layer network over the target's hidden states
drafts k tokens, as a chain or as an EAGLE-2 dynamic tree.

A head (`FeatureHead`) says what the layer reads and gives: `first` makes, from a token's row of
the runner's feature cache, the hidden state its pair carries; `step` runs the layer on pairs
(hidden state h_t, token x_{t+1}) at position t; `read` turns the layer's output into the next
hidden state and the draft logits. EAGLE (heads.py) pairs the target's final-norm feature and
reads the final-normed output through the target's LM head; EAGLE-3 (eagle3.py) pairs a fusion of
three of the target's layers and reads its own head over a draft vocabulary.

The layer keeps a one-layer paged KV cache addressed through the target's block tables. The K/V
at position t come from the pair (h_t, x_{t+1}), so they can be written once the target has
computed position t and the token after it exists. Each proposal first runs, as one chunk, the
pairs the cache lacks with the target's true features (from the runner's feature cache) — after a
prompt, all of them; after a verify pass, the accepted ones — and the chunk's last output gives the
first draft; then k - 1 more steps feed the layer its own next hidden state and draft.
The K/V those steps write came from predicted hidden states, so the cache stays valid only up to the
last true position (`Sequence.draft_computed`).

Tree drafting (SpeculativeConfig.tree, EAGLE-2): after the same catch-up chunk, the root's top_k
next tokens are the first layer of candidates; depth - 1 times, the top_k candidates of the newest
layer by cumulative log-probability (the sum of the draft's log-probabilities along the path, at
DraftTree.temperature) run
through the layer together, each attending to the cache's prefix and its own ancestors (their K/V
kept beside the cache, never written to it), and each adds its top_k next tokens as candidates.
The k candidates of highest cumulative log-probability are the tree (ancestor-closed: a child
never scores above its parent, and ties keep the earlier, the parent), in creation order, so a
parent always comes before its children.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxinfer import sharding
from jaxinfer.buckets import next_power_of_2
from jaxinfer.models import attention
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.family import ACTIVATIONS, rms_norm
from jaxinfer.models.layers import apply_rope
from jaxinfer.models.kv_cache import PagedKVCache, as_floats, copy_pages
from jaxinfer.sampling.processors import Vocab
from jaxinfer.sampling.sampler import SamplingBatch
from jaxinfer.speculative.config import DraftContext, Proposal, register_drafter
from jaxinfer.speculative.draft_model import (
    chunk_batch,
    decode_batch,
    draft_token,
    pages_bucket,
)
from jaxinfer.speculative.heads import (
    CONFIG_FILE,
    draft_logits,
    eagle_features,
    eagle_inputs,
    eagle_layer_config,
    load_heads,
    with_draft_head,
)
from pallas_kernels.common import gather_pages


class FeatureHead(Protocol):
    """What the feature-level drafter runs: static and hashable (a jit argument); its params are a
    separate pytree. Axes: ... any leading axes, D the layer's hidden size, W the feature-cache
    row width, V the target's vocabulary."""

    cfg1: ModelConfig  # the layer's shapes and RoPE (its paged cache)

    def first(self, target_params, params, rows: jax.Array) -> jax.Array:
        """Feature-cache rows (..., W) -> the hidden state each token's pair carries (..., D)."""

    def step(self, target_params, params, h: jax.Array, tokens: jax.Array, cos, sin, attend, impl):
        """Pairs (h (B, T, D), tokens (B, T)) at the positions of cos/sin through the layer ->
        (output (B, T, D), attend's state)."""

    def read(self, target_params, params, out: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The layer's output (..., D) -> (the next pair's hidden state (..., D), draft logits
        (..., V) float32: -inf outside a draft vocabulary)."""


@dataclasses.dataclass(frozen=True)
class EagleHead:
    """EAGLE (heads.py): x = [f ; e(token)] @ fc through one layer of the target's family; the output,
    final-normed with the target's norm, is the next feature and is read through the target's LM
    head (or its draft-vocabulary columns)."""

    cfg: ModelConfig  # the target's
    cfg1: ModelConfig

    def first(self, target_params, params, rows):
        return rows[..., : self.cfg.hidden_size]

    def step(self, target_params, params, h, tokens, cos, sin, attend, impl):
        x = eagle_inputs(target_params, params, h, tokens)
        return model_lib.layer(self.cfg1, params["layer"], x, cos, sin, attend, model_lib.dense_projection(impl))

    def read(self, target_params, params, out):
        f = eagle_features(target_params, self.cfg, out)
        return f, draft_logits(target_params, self.cfg, params, f)


@dataclasses.dataclass(frozen=True)
class EagleReferenceHead:
    """EAGLE-1/2 as its reference repository (SafeAILab/EAGLE) and vLLM/SGLang define it:
    x = [e(token) ; f] @ fc (+ fc bias), one Llama layer without its input norm, and the output
    itself (no norm) is both the next feature and the LM head's input (the target's head)."""

    cfg: ModelConfig  # the target's
    cfg1: ModelConfig

    def first(self, target_params, params, rows):
        return rows[..., : self.cfg.hidden_size]

    def step(self, target_params, params, h, tokens, cos, sin, attend, impl):
        e = target_params["embed"][tokens].astype(h.dtype) if "embed" not in params else params["embed"][tokens]
        x = jnp.concatenate([e, h], axis=-1) @ params["fc"]
        if "fc_bias" in params:
            x = x + params["fc_bias"]
        return drafter_layer(self.cfg1, params["layer"], x, x, cos, sin, attend, model_lib.dense_projection(impl))

    def read(self, target_params, params, out):
        return out, draft_logits(target_params, self.cfg, params, out)


def drafter_layer(cfg1: ModelConfig, lp, u, x, cos, sin, attend, project):
    """A Llama layer whose attention reads u (B, T, *) as given (no input norm) over the residual
    x (B, T, D): EAGLE-1's first layer (u = x) and EAGLE-3's (u its two normed inputs side by side)."""
    B, T, _ = x.shape
    N, K, H = cfg1.num_heads, cfg1.num_kv_heads, cfg1.head_dim
    q = project("wq", u, lp).reshape(B, T, N, H)
    k = project("wk", u, lp).reshape(B, T, K, H)
    v = project("wv", u, lp).reshape(B, T, K, H)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, state = attend(q, k, v)
    y = x + project("wo", o.reshape(B, T, N * H), lp)
    m = rms_norm(y, lp["mlp_norm"], cfg1.rms_norm_eps)
    act = ACTIVATIONS[cfg1.family.activation]
    return y + project("w_down", act(project("w_gate", m, lp)) * project("w_up", m, lp), lp), state


def _layer(head, target_params, params, h, tokens, cache, batch, impl):
    """The layer over a flat step: pairs (h (N, D), tokens (N,)) at batch.positions -> output (N, D), cache."""
    positions = batch.positions[None]
    cfg1 = head.cfg1
    cos, sin = model_lib.rope_tables(cfg1, positions, h.dtype)

    def attend(q, k, v):
        return attention.attend_cached(cache, 0, q, k, v, positions, cfg1.layer_windows[0], batch, impl=impl.attention)

    out, cache = head.step(target_params, params, h[None], tokens[None], cos, sin, attend, impl)
    return out[0], cache


@functools.partial(jax.jit, static_argnames=("head", "impl", "k"), donate_argnames=("cache",))
def _propose(head, target_params, params, features, cache, next_tokens, start, lens, tables, valid, sp, steps,
             *, impl, k):
    """Pairs (h_t, x_{t+1}) for t in [start, start + lens) per row -> drafts (R, k), cache."""
    page, P = cache.page_size, cache.num_pages
    (h, logits), cache = _catch_up(head, target_params, params, features, cache, next_tokens, start, lens, tables,
                                   impl)
    drafted = jnp.full((next_tokens.shape[0], k), -1, jnp.int32)
    first, drafted = draft_token(logits, sp, steps, 0, drafted)

    def one(carry, j):
        token, h, drafted, cache = carry
        batch = decode_batch(start + lens - 1 + j, j < valid, tables, page, P)
        out, cache = _layer(head, target_params, params, h, token, cache, batch, impl)
        h, logits = head.read(target_params, params, out)
        d, drafted = draft_token(logits, sp, steps, j, drafted)
        return (d, h, drafted, cache), None

    (_, _, drafted, cache), _ = jax.lax.scan(one, (first, h, drafted, cache), jnp.arange(1, k))
    return drafted, cache


def _catch_up(head, target_params, params, features, cache, next_tokens, start, lens, tables, impl):
    """Pairs (h_t, x_{t+1}) for t in [start, start + lens) per row through the layer, h_t from the
    target's features -> (next hidden state (R, D), draft logits (R, V)) after each row's last pair,
    the cache."""
    R, C = next_tokens.shape
    batch = chunk_batch(start, lens, tables, C, cache.page_size, cache.num_pages)
    h = head.first(target_params, params, features[batch.slot_mapping])  # (R * C, D) (dropped slots: clamped junk)
    out, cache = _layer(head, target_params, params, h, next_tokens.reshape(R * C), cache, batch, impl)
    return head.read(target_params, params, out[batch.logits_at]), cache


@functools.partial(jax.jit, static_argnames=("head", "impl", "k", "top_k", "depth", "temperature"),
                   donate_argnames=("cache",))
def _propose_tree(head, target_params, params, features, cache, next_tokens, start, lens, tables, *, impl, k,
                  top_k, depth, temperature):
    """Pairs as in _propose, then a dynamic tree (module docstring) -> drafts (R, k), parents (R, k)
    (tree.py's layout), the cache (holding the true pairs only)."""
    R = next_tokens.shape[0]
    K, rows = top_k, jnp.arange(R)[:, None]
    (root, logits), cache = _catch_up(head, target_params, params, features, cache, next_tokens, start, lens, tables,
                                      impl)
    n = start + lens  # (R,) the root's position: tree tokens of depth d pair up at n + d - 1

    def log_probs(logits):
        return jax.nn.log_softmax(logits / temperature, axis=-1)

    score, token = jax.lax.top_k(log_probs(logits), K)  # (R, K): the first layer of candidates
    parent = jnp.full((R, K), -1, jnp.int32)  # candidate index of each candidate's parent (-1: the root)
    inputs = jnp.broadcast_to(root[:, None], (R, K, root.shape[-1]))  # (R, N, D) the hidden state each pairs with

    prefix = [as_floats(gather_pages(x[0], tables)) for x in (cache.k, cache.v)]  # (R, S, Kv, H) the layer's cache
    S = prefix[0].shape[1]
    prefix_pos = jnp.where(jnp.arange(S)[None, :] < n[:, None], jnp.arange(S)[None, :], -1)  # (R, S)
    T = (depth - 1) * K  # candidates run through the layer, K per step
    tree_k, tree_v = (jnp.zeros((R, T, *x.shape[2:]), x.dtype) for x in prefix)
    tree_pos = jnp.full((R, T), -1, jnp.int32)
    sees = jnp.zeros((R, T, T), jnp.bool_)  # [r, a, b]: run candidate a sees run candidate b
    run_slot = jnp.full((R, K + T * K), -1, jnp.int32)  # each candidate's slot among the run ones
    frontier = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (R, K))

    for d in range(1, depth):  # run the frontier (depth d), add its children (depth d + 1)
        slots = (d - 1) * K + jnp.arange(K)  # (K,)
        up = jnp.take_along_axis(parent, frontier, axis=1)  # (R, K)
        up_slot = jnp.where(up >= 0, jnp.take_along_axis(run_slot, jnp.maximum(up, 0), axis=1), -1)
        mine = jnp.where((up_slot >= 0)[..., None], sees[rows, jnp.maximum(up_slot, 0)], False)
        mine |= jax.nn.one_hot(slots, T, dtype=jnp.bool_)[None]  # (R, K, T): its ancestors and itself
        sees = sees.at[:, slots].set(mine)
        run_slot = run_slot.at[rows, frontier].set(slots[None])
        pos = jnp.broadcast_to((n + d - 1)[:, None], (R, K))
        tree_pos = tree_pos.at[:, slots].set(pos)

        def attend(q, k_new, v_new):
            keys = jnp.concatenate([prefix[0], tree_k.at[:, slots].set(k_new)], axis=1)  # (R, S + T, Kv, H)
            values = jnp.concatenate([prefix[1], tree_v.at[:, slots].set(v_new)], axis=1)
            visible = jnp.concatenate([jnp.ones((R, K, S), jnp.bool_), mine], axis=2)
            k_pos = jnp.concatenate([prefix_pos, tree_pos], axis=1)
            out = attention.xla_attention(q, keys, values, pos, k_pos, mask=visible)
            return out, (keys[:, S:], values[:, S:])

        cos, sin = model_lib.rope_tables(head.cfg1, pos, root.dtype)
        out, (tree_k, tree_v) = head.step(target_params, params, jnp.take_along_axis(inputs, frontier[..., None], axis=1),
                                          jnp.take_along_axis(token, frontier, axis=1), cos, sin, attend, impl)
        h, logits = head.read(target_params, params, out)  # (R, K, D), (R, K, V)
        child_score, child = jax.lax.top_k(log_probs(logits), K)  # (R, K, K)
        child_score += jnp.take_along_axis(score, frontier, axis=1)[..., None]
        offset = score.shape[1]
        score = jnp.concatenate([score, child_score.reshape(R, K * K)], axis=1)
        token = jnp.concatenate([token, child.reshape(R, K * K)], axis=1)
        parent = jnp.concatenate([parent, jnp.repeat(frontier, K, axis=1)], axis=1)
        inputs = jnp.concatenate([inputs, jnp.repeat(h, K, axis=1)], axis=1)
        frontier = offset + jax.lax.top_k(child_score.reshape(R, K * K), K)[1]

    chosen = jnp.sort(jax.lax.top_k(score, k)[1], axis=1)  # (R, k) in creation order
    up = jnp.take_along_axis(parent, chosen, axis=1)
    index = jnp.argmax(chosen[:, None, :] == up[:, :, None], axis=2)  # the parent's place among the chosen
    parents = jnp.where(up >= 0, index + 1, 0).astype(jnp.int32)
    return jnp.take_along_axis(token, chosen, axis=1).astype(jnp.int32), parents, cache


class FeatureDrafter:
    """A head and its params, drafting for a target through its own one-layer paged cache.
    feature_layers: the target layers whose input hidden states the head's `first` reads (the
    runner keeps them in the feature cache, after the final-norm hidden state)."""

    def __init__(self, target, head, params, num_pages: int, page_size: int, max_seq_len: int, impl, tree=None,
                 feature_layers: tuple[int, ...] = ()):
        self.target, self.head, self.params, self.impl, self.tree = target, head, params, impl, tree
        self.vocab, self.feature_layers = Vocab.of(target), tuple(feature_layers)
        self.page_size, self.max_seq_len = page_size, max_seq_len
        self.cache = PagedKVCache.zeros(head.cfg1, num_pages, page_size, target.dtype)

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        R = next_power_of_2(len(seqs))
        C = next_power_of_2(max(s.num_computed - s.draft_computed for s in seqs), 2)
        M = pages_bucket(seqs, self.page_size, self.max_seq_len)
        next_tokens, tables = np.zeros((R, C), np.int32), np.zeros((R, M), np.int32)
        start, lens, valid, steps = (np.zeros(R, np.int32) for _ in range(4))
        for i, (s, w) in enumerate(zip(seqs, num_drafts)):
            c = s.num_computed - s.draft_computed
            next_tokens[i, :c] = s.tokens[s.draft_computed + 1 : s.num_computed + 1]
            tables[i, : len(s.pages)] = s.pages
            start[i], lens[i], valid[i], steps[i] = s.draft_computed, c, w, len(s.generated)
        args = (self.head, self.target.params, self.params, features, self.cache, next_tokens, start, lens, tables)
        if self.tree is None:
            sp = SamplingBatch.from_rows(seqs, R, self.vocab, drafting=True)
            drafts, self.cache = _propose(*args, valid, sp, steps, impl=self.impl, k=k)
            parents = None
        else:
            drafts, parents, self.cache = _propose_tree(*args, impl=self.impl, k=k, top_k=self.tree.top_k,
                                                        depth=self.tree.depth, temperature=self.tree.temperature)
        for s in seqs:
            s.draft_computed = s.num_computed  # later positions were written from predicted hidden states
        return Proposal(drafts, parents=parents)

    def accepted(self, seqs) -> None:
        for s in seqs:
            s.draft_computed = min(s.draft_computed, s.num_computed)

    def copy_pages(self, copies) -> None:
        src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
        self.cache = copy_pages(self.cache, src, dst)


def check_tree(ctx: DraftContext) -> None:
    if ctx.config.tree is not None and any(ctx.target.config.layer_windows):
        raise ValueError("speculative tree= needs a target without sliding windows (tree tokens sit at their "
                         "depth's position but in consecutive slots)")


@register_drafter("eagle", checkpoint=True, features=True, tree=True, markers=(CONFIG_FILE, "config.json"))  # ours, or the reference repository's
def build(ctx: DraftContext) -> FeatureDrafter:
    check_tree(ctx)
    checkpoint = sharding.logical_config(ctx.target)  # the heads' shapes (a placed target may replicate KV heads)
    if is_reference_checkpoint(ctx.path):
        cfg1, params = load_reference(ctx.path, checkpoint, ctx.target.dtype)
        return FeatureDrafter(ctx.target, EagleReferenceHead(ctx.target.config, cfg1), params, ctx.num_pages,
                              ctx.page_size, ctx.max_seq_len, ctx.impl, ctx.config.tree)
    params, _ = load_heads(ctx.path, "eagle", checkpoint, ctx.target.dtype)
    head = EagleHead(ctx.target.config, eagle_layer_config(checkpoint))
    return FeatureDrafter(ctx.target, head, with_draft_head(ctx.target.params, ctx.target.config, params),
                          ctx.num_pages, ctx.page_size, ctx.max_seq_len, ctx.impl, ctx.config.tree)


# --- the EAGLE reference repository's checkpoints -------------------------------------------------

REFERENCE_TENSORS = {  # ours -> (theirs, stored transposed), under the layer's "layers.0." prefix
    "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False), "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True), "w_down": ("mlp.down_proj.weight", True),
}


def is_reference_checkpoint(path) -> bool:
    """A directory of the EAGLE reference repository's layout: config.json and weights, no drafter.json."""
    return (os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, CONFIG_FILE))
            and any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin")))


def _reference_tensors(path) -> dict[str, np.ndarray]:
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
            return {k.removeprefix("model."): f.get_tensor(k) for k in f.keys()}
    try:
        import torch  # noqa: PLC0415  (pytorch_model.bin is a torch pickle)
    except ImportError:
        raise ValueError(f"draft={os.fspath(path)!r} holds pytorch_model.bin, which needs torch to read "
                         "(pip install 'jaxinfer[peers]'), or convert it to model.safetensors") from None
    state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return {k.removeprefix("model."): v.float().numpy() for k, v in state.items()}


def load_reference(path, target: ModelConfig, dtype) -> tuple[ModelConfig, dict]:
    """(layer config, params) of an EAGLE-1/2 checkpoint as the reference repository publishes it
    (config.json, model.safetensors or pytorch_model.bin: fc.weight (D, 2D), optional fc.bias,
    layers.0.* without input_layernorm, optional embed_tokens.weight), checked against the target:
    a misfit names the tensor and both shapes."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    for field in ("hidden_size", "vocab_size"):
        if hf.get(field) != getattr(target, field):
            raise ValueError(f"draft={os.fspath(path)!r}: config.json {field}={hf.get(field)}, the target's is "
                             f"{getattr(target, field)}")
    if hf.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft={os.fspath(path)!r}: num_hidden_layers={hf.get('num_hidden_layers')}: an EAGLE "
                         "drafter has one layer")
    cfg1 = ModelConfig.from_hf_dict({**hf, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                     "tie_word_embeddings": False})
    D, F, N, K, H = cfg1.hidden_size, cfg1.intermediate_size, cfg1.num_heads, cfg1.num_kv_heads, cfg1.head_dim
    shapes = {"wq": (D, N * H), "wk": (D, K * H), "wv": (D, K * H), "wo": (N * H, D), "mlp_norm": (D,),
              "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    found = _reference_tensors(path)

    def take(name, shape, transpose):
        want = tuple(shape[::-1]) if transpose else tuple(shape)
        if name not in found:
            raise ValueError(f"draft={os.fspath(path)!r}: missing tensor {name!r} (expected shape {want})")
        x = np.asarray(found.pop(name), np.float32)
        if x.shape != want:
            raise ValueError(f"draft={os.fspath(path)!r}: tensor {name!r} has shape {x.shape}, the target needs {want}")
        return jnp.asarray(x.T if transpose else x, dtype)

    layer = {ours: take("layers.0." + theirs, shapes[ours], t) for ours, (theirs, t) in REFERENCE_TENSORS.items()}
    params = {"fc": take("fc.weight", (2 * D, D), True), "layer": layer}
    if "fc.bias" in found:
        params["fc_bias"] = take("fc.bias", (D,), False)
    if "embed_tokens.weight" in found:
        params["embed"] = take("embed_tokens.weight", (target.vocab_size, D), False)
    extra = sorted(k for k in found if "rotary_emb" not in k)
    if extra:
        raise ValueError(f"draft={os.fspath(path)!r}: unexpected tensor {extra[0]!r}")
    return dataclasses.replace(cfg1, vocab_size=target.vocab_size), params
