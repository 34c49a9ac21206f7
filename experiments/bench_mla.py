"""Multi-head latent attention's decode: the absorbed form against the expanded form over a latent
paged cache, by context length, and the bytes each reads per token.

  python -m jaxinfer.experiments.bench_mla                                   # DeepSeek-V2-Lite's attention shape
  python -m jaxinfer.experiments.bench_mla --mla_heads=128 --contexts=1024,8192   # DeepSeek-V2 / V3's 128 heads
  python -m jaxinfer.experiments.bench_mla --attention=pallas                # on a GPU: the latent decode kernel

One layer's decode step (jaxinfer.models.latent_attention.attend_latent over a latent PagedKVCache, one new
token per sequence, random latent rows and queries, --dtype): "absorbed" takes each query into
latent space (q_nope @ w_uk^T per head), attends over the cache rows as one KV head shared by all
heads (the values: each row's latent) and up-projects the output by w_uv; "expanded" up-projects
every context row to per-head keys and values first. Both give the same output (reported: the
largest row-relative difference). Per token and layer the cache read is S x (C + R) values in both
forms; the expanded form also writes and reads S x N x (head_dim + Hv) expanded values and spends
2 x S x C x N x (nope + Hv) flops on the up-projection. Writes JSON to --out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm.auto import tqdm

from jaxinfer.models import latent_attention
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.kv_cache import BatchDescriptor, Latent, PagedKVCache

from . import common
from .common import environment, median_call_time

FLAGS = flags.FLAGS
for _name in ("out", "runs", "calls", "dtype", "attention"):
    flags.declare_key_flag(_name)
RUNS = 5
_HEADS = flags.DEFINE_integer("mla_heads", 16, "Query heads (N).")
_LATENT = flags.DEFINE_integer("kv_lora_rank", 512, "Latent width (C).")
_ROPE = flags.DEFINE_integer("qk_rope_head_dim", 64, "Rotated key width shared by the heads (R).")
_NOPE = flags.DEFINE_integer("qk_nope_head_dim", 128, "Per-head key width without RoPE.")
_VALUE = flags.DEFINE_integer("v_head_dim", 128, "Per-head value width (Hv).")
_CONTEXTS = flags.DEFINE_list("contexts", ["256", "1024", "4096"], "Context lengths (tokens) to time.")
_BATCH = flags.DEFINE_integer("mla_batch", 1, "Sequences decoding at once.")
PAGE = 16
FORMS = latent_attention.MLA_FORMS


def layer_config() -> ModelConfig:
    for name, flag in (("mla_heads", _HEADS), ("kv_lora_rank", _LATENT), ("qk_rope_head_dim", _ROPE),
                       ("qk_nope_head_dim", _NOPE), ("v_head_dim", _VALUE), ("mla_batch", _BATCH)):
        if flag.value < 1:
            raise ValueError(f"--{name}={flag.value} must be >= 1")
    head_dim = _NOPE.value + _ROPE.value
    return ModelConfig(model_type="deepseek_v2", vocab_size=16, hidden_size=64, intermediate_size=64, num_layers=1,
                       num_heads=_HEADS.value, num_kv_heads=_HEADS.value, head_dim=head_dim,
                       kv_lora_rank=_LATENT.value, qk_rope_head_dim=_ROPE.value, v_head_dim=_VALUE.value)


def step_inputs(cfg: ModelConfig, context: int, batch: int, dtype, key):
    """A latent cache holding `context - 1` random rows per sequence (pages shuffled), and one decode
    step's inputs: queries (1, B, N, H), new rows, the up-projections, the batch descriptor."""
    C, R, N, H, Hv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_heads, cfg.head_dim, cfg.v_head_dim
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    k1, k2, k3, k4 = jax.random.split(key, 4)
    cache = PagedKVCache.zeros(cfg, num_pages, PAGE, dtype)
    cache = cache.replace(k=jax.random.normal(k1, cache.k.shape, jnp.float32).astype(cache.k.dtype))
    tables = np.random.default_rng(context).permutation(num_pages - 1)[: batch * pages_per_seq]
    tables = jnp.asarray(tables.reshape(batch, pages_per_seq), jnp.int32)
    positions = jnp.full((batch,), context - 1, jnp.int32)
    desc = BatchDescriptor.decode_rows(positions, jnp.ones((batch,), bool), tables, PAGE, num_pages * PAGE)
    q = jax.random.normal(k2, (1, batch, N, H), dtype)
    w_kv = jax.random.normal(k3, (C, N, H - R + Hv), jnp.float32) * C**-0.5
    latent = Latent(rows=jax.random.normal(k4, (1, batch, C + R), dtype), w_uk=w_kv[..., : H - R].astype(dtype),
                    w_uv=w_kv[..., H - R:].astype(dtype))
    return cache, q, latent, desc


def per_token_bytes(cfg: ModelConfig, context: int, itemsize: int) -> dict:
    """Per sequence and layer, one decode step: the cache read (both forms), and what the expanded
    form writes and reads again (its per-head keys and values)."""
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    expanded = context * cfg.num_heads * (cfg.head_dim + cfg.v_head_dim) * itemsize
    return dict(cache_read=context * row * itemsize, expanded_written_and_read=2 * expanded,
                up_projection_flops=2 * context * cfg.kv_lora_rank * cfg.num_heads *
                (cfg.head_dim - cfg.qk_rope_head_dim + cfg.v_head_dim))


def main(argv):
    del argv
    cfg = layer_config()
    contexts = [int(c) for c in _CONTEXTS.value]
    if min(contexts) < 1:
        raise ValueError(f"--contexts={_CONTEXTS.value}: every length must be >= 1")
    dtype = jnp.dtype(FLAGS.dtype)
    impl = FLAGS.attention if FLAGS.attention != "auto" else ("pallas" if jax.default_backend() == "gpu" else "xla")

    def step(form):
        def run(cache, q, latent, desc):
            out, _ = latent_attention.attend_latent(cache, 0, q, latent, 0, desc, impl=impl, mla=(form, "expanded"))
            return out
        return jax.jit(run)

    fns = {form: step(form) for form in FORMS}
    runs = common.value_or("runs", RUNS)
    rows = []
    for context in tqdm(contexts, desc="contexts", unit="context"):
        args = step_inputs(cfg, context, _BATCH.value, dtype, jax.random.key(context))
        outs = {form: np.asarray(jax.block_until_ready(fns[form](*args)), np.float32) for form in FORMS}
        scale = np.maximum(np.abs(outs["expanded"]).max(axis=-1, keepdims=True), 1e-30)
        row = dict(context=context, ms={}, max_row_rel_diff=float((np.abs(outs["absorbed"] - outs["expanded"])
                                                                  / scale).max()),
                   per_token=per_token_bytes(cfg, context, dtype.itemsize))
        for form in FORMS:
            row["ms"][form] = median_call_time(fns[form], [args], runs, FLAGS.calls) * 1e3
        rows.append(row)
    result = dict(environment=environment(__name__), attention=impl, dtype=FLAGS.dtype, batch=_BATCH.value,
                  heads=cfg.num_heads, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                  qk_nope_head_dim=cfg.head_dim - cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, results=rows)
    if FLAGS.out:
        common.write_json(FLAGS.out, result)
    print(f"MLA decode on {jax.devices()[0].device_kind} ({impl}): N={cfg.num_heads}, C={cfg.kv_lora_rank}, "
          f"R={cfg.qk_rope_head_dim}, head_dim={cfg.head_dim}, Hv={cfg.v_head_dim}, batch {_BATCH.value}, "
          f"{FLAGS.dtype}; median of {runs} runs of {FLAGS.calls} calls")
    print(f"{'context':>8} {'absorbed ms':>12} {'expanded ms':>12} {'ratio':>6} {'cache MB':>9} {'expanded MB':>12} "
          f"{'rel diff':>9}")
    for r in rows:
        b = r["per_token"]
        print(f"{r['context']:>8} {r['ms']['absorbed']:>12.3f} {r['ms']['expanded']:>12.3f} "
              f"{r['ms']['expanded'] / r['ms']['absorbed']:>6.1f} {b['cache_read'] / 1e6:>9.3f} "
              f"{b['expanded_written_and_read'] / 1e6:>12.3f} {r['max_row_rel_diff']:>9.1e}")


if __name__ == "__main__":
    common.run(main)
