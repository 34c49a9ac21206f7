"""EAGLE-3 (Li et al. 2025, arXiv:2503.01840): a one-layer drafter over a fusion of three of the
target's layers, trained on its own predictions (training-time test), drafting from its own head
over a draft vocabulary. The model and checkpoint format are those SGLang and vLLM load
(`LlamaForCausalLMEagle3`), so a published head (e.g. EAGLE3-LLaMA3.1-Instruct-8B) drafts here
unchanged, and a head trained here (experiments.train_drafter --method=eagle3) loads there.

The model (D the draft's hidden size, Dt the target's, W the draft vocabulary):
  g_t = [a_t ; b_t ; c_t] @ fc                  the hidden states entering three target layers,
                                                low/middle/high (default 2, L // 2, L - 3), fused (3Dt -> D)
  one Llama-style layer on the pair (h_t, x_{t+1}), h_t = g_t for a token the target computed:
      u = [norm(e(x_{t+1}), input_norm) ; norm(h_t, hidden_norm)]       (2D: its attention input)
      y = h_t + attention(u @ wq, u @ wk, u @ wv) @ wo                   (h_t the residual)
      out = y + mlp(norm(y, mlp_norm))
  logits = norm(out, norm) @ lm_head (D -> W), draft token i is target token draft_vocab[i]
  the next pair carries h = out (the layer's output before its norm)
e is the target's embedding unless the checkpoint brings its own. Drafting runs on the feature-level
drafter of eagle.py (chain or EAGLE-2 tree), verified by the usual lossless rule.

The file format (a directory): config.json, a Llama config of one layer with architectures
["LlamaForCausalLMEagle3"], vocab_size the target's, draft_vocab_size W, optional
eagle_aux_hidden_state_layer_ids (vLLM: the layers whose input is fused) or
eagle_config.eagle_aux_hidden_state_layer_ids (SGLang: the layers whose output is fused, one less),
target_hidden_size where it differs; model.safetensors (torch layout, (out, in)): fc.weight
(D, 3Dt), midlayer.{input_layernorm, hidden_norm, post_attention_layernorm}.weight,
midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight, norm.weight,
lm_head.weight (W, D), d2t (W,) int (target id = draft id + d2t), t2d (V,) bool (the target tokens
in the draft vocabulary), optional embed_tokens.weight (V, D).

`unroll` is the reference of chain drafting over whole windows (training and evaluation): step 0
runs every pair with the target's fused features; step j >= 1 runs, at each row t, the pair
(step j - 1's output at t, token t + j + 1) at position t + j, attending to step 0's keys at
positions <= t and to its own earlier steps at row t — exactly what a chain anchored at t sees.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxinfer import sharding
from jaxinfer.models import attention, matmul
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.config import ConfigError, ModelConfig
from jaxinfer.models.family import rms_norm
from jaxinfer.speculative.config import DraftContext, register_drafter
from jaxinfer.speculative.eagle import FeatureDrafter, check_tree, drafter_layer

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# jaxinfer's params -> the published tensor names, and whether the tensor is stored transposed.
LAYER_TENSORS = {
    "input_norm": ("midlayer.input_layernorm.weight", False),
    "hidden_norm": ("midlayer.hidden_norm.weight", False),
    "wq": ("midlayer.self_attn.q_proj.weight", True),
    "wk": ("midlayer.self_attn.k_proj.weight", True),
    "wv": ("midlayer.self_attn.v_proj.weight", True),
    "wo": ("midlayer.self_attn.o_proj.weight", True),
    "mlp_norm": ("midlayer.post_attention_layernorm.weight", False),
    "w_gate": ("midlayer.mlp.gate_proj.weight", True),
    "w_up": ("midlayer.mlp.up_proj.weight", True),
    "w_down": ("midlayer.mlp.down_proj.weight", True),
}
TOP_TENSORS = {"fc": ("fc.weight", True), "norm": ("norm.weight", False), "lm_head": ("lm_head.weight", True),
               "embed": ("embed_tokens.weight", False)}


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The target layers whose input hidden states are fused when the draft names none (SGLang's
    and vLLM's default; three distinct layers from 6 layers on)."""
    return (2, num_layers // 2, num_layers - 3)


def aux_layers_for(num_layers: int) -> tuple[int, int, int]:
    """The layers a new head fuses, in increasing order (the order fc reads them in): the default,
    or, for a target too shallow for it, the inputs of its first, middle and last layer."""
    aux = default_aux_layers(num_layers)
    if len(set(aux)) == 3 and min(aux) >= 0:
        return tuple(sorted(aux))
    return (0, num_layers // 2, num_layers - 1)  # repeats a layer below 3 layers (jaxinfer reads it; vLLM would not)


@dataclasses.dataclass(frozen=True)
class Eagle3Head:
    """The EAGLE-3 head as eagle.FeatureHead: static shapes only (params are separate)."""

    cfg1: ModelConfig  # the midlayer (Llama-style, one layer); its vocab_size is the target's
    target_hidden: int

    def first(self, target_params, params, rows):
        return fuse(params, rows[..., self.target_hidden :])  # the feature cache after the final-norm state

    def step(self, target_params, params, h, tokens, cos, sin, attend, impl):
        table = params["embed"] if "embed" in params else target_params["embed"]
        return midlayer(self.cfg1, params["layer"], table[tokens].astype(h.dtype), h, cos, sin, attend,
                        model_lib.dense_projection(impl))

    def read(self, target_params, params, out):
        return out, logits(self.cfg1, params, out)


def fuse(params, aux: jax.Array) -> jax.Array:
    """The three fused layers' inputs, concatenated in layer order (..., 3Dt) -> g (..., D)."""
    return matmul.dense(aux.astype(params["fc"].dtype), params["fc"])


def midlayer(cfg1: ModelConfig, lp, e, h, cos, sin, attend, project):
    """The EAGLE-3 layer (module docstring): embeddings e and hidden states h (B, T, D) -> (B, T, D)."""
    eps = cfg1.rms_norm_eps
    u = jnp.concatenate([rms_norm(e, lp["input_norm"], eps), rms_norm(h, lp["hidden_norm"], eps)], axis=-1)
    return drafter_layer(cfg1, lp, u, h, cos, sin, attend, project)


def draft_head_logits(cfg1: ModelConfig, params, out: jax.Array) -> jax.Array:
    """The layer's output (..., D) -> logits over the draft vocabulary (..., W), float32."""
    normed = rms_norm(out, params["norm"], cfg1.rms_norm_eps)
    return jnp.einsum("...D,DW->...W", normed, params["lm_head"], preferred_element_type=jnp.float32)


def logits(cfg1: ModelConfig, params, out: jax.Array) -> jax.Array:
    """(..., D) -> (..., V) float32 over the target's vocabulary: -inf outside the draft vocabulary."""
    sub = draft_head_logits(cfg1, params, out)
    if "draft_vocab" not in params:
        return sub
    full = jnp.full((*out.shape[:-1], cfg1.vocab_size), -jnp.inf, jnp.float32)
    return full.at[..., params["draft_vocab"]].set(sub)


def layer_config(target: ModelConfig, hidden_size: int | None = None) -> ModelConfig:
    """A midlayer config for a target (its head count, RoPE and norm; Llama-style, one layer)."""
    hidden = hidden_size or target.hidden_size
    return ModelConfig(vocab_size=target.vocab_size, hidden_size=hidden, intermediate_size=target.intermediate_size,
                       num_layers=1, num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
                       head_dim=target.head_dim, rms_norm_eps=target.rms_norm_eps, rope=target.rope,
                       max_position_embeddings=target.max_position_embeddings, tie_word_embeddings=False)


def init_params(cfg1: ModelConfig, target_hidden: int, key: jax.Array, draft_vocab: np.ndarray | None = None,
                dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random params (weights ~ N(0, std), norms at 1); draft_vocab (W,) sorted target ids, or None
    for the whole vocabulary."""
    D, F, N, K, H = (cfg1.hidden_size, cfg1.intermediate_size, cfg1.num_heads, cfg1.num_kv_heads, cfg1.head_dim)
    W = cfg1.vocab_size if draft_vocab is None else int(np.asarray(draft_vocab).size)
    shapes = {"wq": (2 * D, N * H), "wk": (2 * D, K * H), "wv": (2 * D, K * H), "wo": (N * H, D),
              "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    keys = jax.random.split(key, len(shapes) + 2)
    layer = {name: (std * jax.random.normal(k, s, jnp.float32)).astype(dtype) for (name, s), k in zip(shapes.items(), keys)}
    layer.update({name: jnp.ones((D,), dtype) for name in ("input_norm", "hidden_norm", "mlp_norm")})
    params = {"fc": (std * jax.random.normal(keys[-2], (3 * target_hidden, D), jnp.float32)).astype(dtype),
              "layer": layer, "norm": jnp.ones((D,), dtype),
              "lm_head": (std * jax.random.normal(keys[-1], (D, W), jnp.float32)).astype(dtype)}
    if draft_vocab is not None:
        params["draft_vocab"] = jnp.asarray(draft_vocab, jnp.int32)
    return params


# --- the published format -------------------------------------------------------------------------


def _draft_error(path, message: str) -> ValueError:
    return ValueError(f"draft={os.fspath(path)!r}: {message}")


def read_config(path, target: ModelConfig) -> tuple[ModelConfig, int, tuple[int, ...], int]:
    """(midlayer config, target hidden size, aux layers, draft vocabulary size) of an EAGLE-3
    directory's config.json, checked against the target."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise _draft_error(path, f"no {CONFIG_FILE}: not an EAGLE-3 drafter directory")
    with open(config_path) as f:
        hf = json.load(f)
    if ARCHITECTURE not in (hf.get("architectures") or []):
        raise _draft_error(path, f"config.json architectures={hf.get('architectures')!r}, not [{ARCHITECTURE!r}]")
    if hf.get("num_hidden_layers", 1) != 1:
        raise _draft_error(path, f"num_hidden_layers={hf.get('num_hidden_layers')}: an EAGLE-3 drafter has one layer")
    if hf.get("vocab_size") != target.vocab_size:
        raise _draft_error(path, f"vocab_size={hf.get('vocab_size')}, the target's is {target.vocab_size}")
    try:
        cfg1 = ModelConfig.from_hf_dict({**hf, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                         "tie_word_embeddings": False})
    except ConfigError as e:
        raise _draft_error(path, f"config.json: {e}") from None
    target_hidden = hf.get("target_hidden_size") or target.hidden_size
    if target_hidden != target.hidden_size:
        raise _draft_error(path, f"target_hidden_size={target_hidden}, the target's hidden size is {target.hidden_size}")
    W = hf.get("draft_vocab_size") or target.vocab_size
    if not isinstance(W, int) or not 0 < W <= target.vocab_size:
        raise _draft_error(path, f"draft_vocab_size={W!r} must be an integer in [1, {target.vocab_size}]")
    vllm_ids = hf.get("eagle_aux_hidden_state_layer_ids")
    sglang_ids = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if sglang_ids is not None:
        sglang_ids = [i + 1 for i in sglang_ids]  # SGLang names the layer whose output is fused
    if vllm_ids is not None and sglang_ids is not None and list(vllm_ids) != sglang_ids:
        raise _draft_error(path, f"eagle_aux_hidden_state_layer_ids={vllm_ids} (layer inputs) and "
                                 f"eagle_config's {[i - 1 for i in sglang_ids]} (layer outputs) disagree")
    ids = vllm_ids if vllm_ids is not None else sglang_ids
    aux = default_aux_layers(target.num_layers) if not ids else tuple(int(i) for i in ids)
    if len(aux) != 3 or not all(0 <= i < target.num_layers for i in aux) or (
            len(set(aux)) != 3 and target.num_layers >= 3):
        raise _draft_error(path, f"aux hidden-state layers {list(aux)} must be three distinct layers of the "
                                 f"target's {target.num_layers}")
    return cfg1, target_hidden, aux, W


def load(path, target: ModelConfig, dtype) -> tuple[Eagle3Head, dict, tuple[int, ...]]:
    """(head, params in dtype, the target layers to fuse) of an EAGLE-3 directory, every tensor
    checked against the target: a misfit names the tensor and both shapes."""
    cfg1, target_hidden, aux, W = read_config(path, target)
    D, F, N, K, H, V = (cfg1.hidden_size, cfg1.intermediate_size, cfg1.num_heads, cfg1.num_kv_heads, cfg1.head_dim,
                        target.vocab_size)
    ours = {"input_norm": (D,), "hidden_norm": (D,), "mlp_norm": (D,), "wq": (2 * D, N * H), "wk": (2 * D, K * H),
            "wv": (2 * D, K * H), "wo": (N * H, D), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D),
            "fc": (3 * target_hidden, D), "norm": (D,), "lm_head": (D, W), "embed": (V, D)}
    tensors = {**LAYER_TENSORS, **TOP_TENSORS}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise _draft_error(path, "no *.safetensors file")
    found: dict[str, np.ndarray] = {}
    for name in files:
        try:
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                for key in f.keys():
                    found[key.removeprefix("model.")] = f.get_tensor(key)
        except SafetensorError as e:
            raise _draft_error(path, f"{name} is not a readable safetensors file: {e}") from None
    params: dict = {"layer": {}}
    for ours_name, (theirs, transpose) in tensors.items():
        if theirs not in found:
            if ours_name == "embed":
                continue
            raise _draft_error(path, f"missing tensor {theirs!r} (expected shape {_torch_shape(ours[ours_name], transpose)})")
        x = found.pop(theirs)
        if x.shape != _torch_shape(ours[ours_name], transpose):
            raise _draft_error(path, f"tensor {theirs!r} has shape {x.shape}, the target needs "
                                     f"{_torch_shape(ours[ours_name], transpose)}")
        x = jnp.asarray((x.T if transpose else x).astype(np.float32), dtype)
        (params["layer"] if ours_name in LAYER_TENSORS else params)[ours_name] = x
    if "embed" not in params and D != target.hidden_size:
        raise _draft_error(path, f"no embed_tokens.weight, and the draft's hidden size {D} is not the target's "
                                 f"{target.hidden_size} (whose embedding it would use)")
    d2t, t2d = found.pop("d2t", None), found.pop("t2d", None)
    if W < V or d2t is not None:
        if d2t is None:
            raise _draft_error(path, f"draft_vocab_size={W} < vocab_size={V} but no 'd2t' tensor")
        if d2t.shape != (W,):
            raise _draft_error(path, f"tensor 'd2t' has shape {d2t.shape}, the draft vocabulary needs {(W,)}")
        vocab = np.arange(W, dtype=np.int64) + d2t.astype(np.int64)
        if vocab.min() < 0 or vocab.max() >= V or np.unique(vocab).size != W:
            raise _draft_error(path, f"'d2t' maps draft ids to target ids outside [0, {V}) or to one id twice")
        if t2d is not None:
            mask = np.zeros(V, bool)
            mask[vocab] = True
            if t2d.shape != (V,) or not np.array_equal(t2d.astype(bool), mask):
                raise _draft_error(path, "tensor 't2d' does not mark the target ids 'd2t' maps to")
        params["draft_vocab"] = jnp.asarray(vocab, jnp.int32)
    extra = sorted(k for k in found if not k.startswith("rotary_emb"))
    if extra:
        raise _draft_error(path, f"unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return Eagle3Head(dataclasses.replace(cfg1, vocab_size=V), target_hidden), params, aux


def _torch_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return tuple(shape[::-1]) if transpose else tuple(shape)


def save(path, head: Eagle3Head, params: dict, aux_layers: tuple[int, ...], target_config: ModelConfig,
         dtype=np.float32, **info) -> None:
    """Write an EAGLE-3 directory in the published format (weights in dtype; `info` goes into
    config.json under "jaxinfer")."""
    os.makedirs(path, exist_ok=True)
    cfg1 = head.cfg1
    tensors = {}
    for ours_name, (theirs, transpose) in {**LAYER_TENSORS, **TOP_TENSORS}.items():
        source = params["layer"] if ours_name in LAYER_TENSORS else params
        if ours_name not in source:
            continue
        x = np.asarray(jnp.asarray(source[ours_name], jnp.float32))
        tensors[theirs] = np.ascontiguousarray(x.T if transpose else x).astype(dtype)
    W = int(params["lm_head"].shape[1])
    if "draft_vocab" in params:
        vocab = np.asarray(params["draft_vocab"], np.int64)
        tensors["d2t"] = vocab - np.arange(W, dtype=np.int64)
        t2d = np.zeros(target_config.vocab_size, bool)
        t2d[vocab] = True
        tensors["t2d"] = t2d
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    hf = {**cfg1.to_hf_dict(), "architectures": [ARCHITECTURE], "num_hidden_layers": 1,
          "vocab_size": target_config.vocab_size, "draft_vocab_size": W, "tie_word_embeddings": False,
          "torch_dtype": {np.float32: "float32", np.float16: "float16"}.get(dtype, "bfloat16")}
    if head.target_hidden != cfg1.hidden_size:
        hf["target_hidden_size"] = head.target_hidden
    if tuple(aux_layers) != default_aux_layers(target_config.num_layers):
        hf["eagle_aux_hidden_state_layer_ids"] = list(aux_layers)
        hf["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux_layers]}
    if info:
        hf["jaxinfer"] = info
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2)


def write_random(path, target_config: ModelConfig, draft_vocab_size: int | None = None, seed: int = 0,
                 dtype=np.float32) -> str:
    """A randomly initialised head for a target's shape, written in the published format (its
    draft vocabulary the first draft_vocab_size ids): for timing drafting where no trained head
    exists, with SpeculativeConfig(accept=...) setting the acceptance. -> path."""
    cfg1 = layer_config(target_config)
    W = min(draft_vocab_size or target_config.vocab_size, target_config.vocab_size)
    vocab = None if W == target_config.vocab_size else np.arange(W, dtype=np.int32)
    params = init_params(cfg1, target_config.hidden_size, jax.random.key(seed), vocab)
    save(path, Eagle3Head(cfg1, target_config.hidden_size), params, aux_layers_for(target_config.num_layers),
         target_config, dtype=dtype)
    return os.fspath(path)


# --- the reference over whole windows (training, evaluation) -------------------------------------


def unroll(head: Eagle3Head, target_params, params, aux: jax.Array, tokens: jax.Array, steps: int,
           outputs: bool = False) -> list[jax.Array]:
    """Chain drafting over windows, teacher-forced on tokens (module docstring): aux (B, T, 3Dt)
    the fused layers' inputs, tokens (B, T) -> per step j, logits over the draft vocabulary
    (B, T - 1 - j, W) float32, row t guessing token t + j + 2; with outputs, the layer's outputs
    (B, T - 1 - j, D) instead (before the final norm and head: training applies its own)."""
    cfg1 = head.cfg1
    B, T = tokens.shape
    table = params["embed"] if "embed" in params else target_params["embed"]
    project = model_lib.dense_projection()
    t = jnp.arange(T - 1)
    h = fuse(params, aux[:, :-1])  # (B, T - 1, D): the pairs (g_t, x_{t+1})
    keys0, own = None, []  # step 0's K/V (B, T - 1, K, H); later steps' K/V at each row
    out_logits = []
    for j in range(steps):
        n = T - 1 - j  # rows with a token to guess
        h, nxt = h[:, :n], tokens[:, 1 + j : 1 + j + n]
        positions = jnp.broadcast_to(t[:n] + j, (B, n))
        cos, sin = model_lib.rope_tables(cfg1, positions, h.dtype)

        def attend(q, k, v, j=j, n=n):
            if j == 0:
                return _attend_rows(q, k, v, []), (k, v)
            k0, v0 = (x[:, :n] for x in keys0)
            return _attend_rows(q, k0, v0, [(a[:, :n], b[:, :n]) for a, b in own] + [(k, v)]), (k, v)

        out, kv = midlayer(cfg1, params["layer"], table[nxt].astype(h.dtype), h, cos, sin, attend, project)
        if j == 0:
            keys0 = kv
        else:
            own.append(kv)
        out_logits.append(out if outputs else draft_head_logits(cfg1, params, out))
        h = out
    return out_logits


def _attend_rows(q, k0, v0, extra):
    """Row t's query (B, T, N, H) over step 0's keys k0, v0 (B, T, K, H) of rows s <= t (its
    anchor's prefix), and over one key and value of its own row per later step (extra: [(B, T,
    K, H) pairs])."""
    B, T, N, H = q.shape
    K = k0.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k0, preferred_element_type=jnp.float32) * H**-0.5
    S = k0.shape[1]
    visible = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]  # (T, S)
    scores = jnp.where(visible, scores, attention._MASKED)
    diag = [jnp.einsum("BTKGH,BTKH->BKGT", qg, k, preferred_element_type=jnp.float32)[..., None] * H**-0.5
            for k, _ in extra]
    probs = jax.nn.softmax(jnp.concatenate([scores, *diag], axis=-1), axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :S].astype(v0.dtype), v0)
    for i, (_, v) in enumerate(extra):
        out += probs[..., S + i].transpose(0, 3, 1, 2)[..., None].astype(v.dtype) * v[:, :, :, None, :]
    return out.reshape(B, T, N, H)


# --- the drafter -----------------------------------------------------------------------------------


@register_drafter("eagle3", checkpoint=True, features=True, tree=True, markers=(CONFIG_FILE,))
def build(ctx: DraftContext) -> FeatureDrafter:
    check_tree(ctx)
    head, params, aux = load(ctx.path, sharding.logical_config(ctx.target), ctx.target.dtype)
    return FeatureDrafter(ctx.target, head, params, ctx.num_pages, ctx.page_size, ctx.max_seq_len, ctx.impl,
                          ctx.config.tree, feature_layers=tuple(sorted(aux)))
