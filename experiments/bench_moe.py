"""A mixture-of-experts layer's MLP alone: tokens per expert, experts touched per step, and the
grouped matmul against the alternatives, by the number of tokens in a step.

  python -m jaxinfer.experiments.bench_moe                                # 8 experts, top 2 (Mixtral's routing)
  python -m jaxinfer.experiments.bench_moe --experts=128 --experts_per_token=8 --moe_hidden=512 --moe_ffn=192  # Qwen3-30B-A3B's
  python -m jaxinfer.experiments.bench_moe --paths=xla,pallas            # on a GPU: the Pallas grouped GEMM too

One random layer (router, experts; --dtype, float32 by default), random normed inputs. For each
--tokens count it reports the experts the step touches (measured, and the planner's uniform-routing
expectation, jaxinfer.memory.experts_touched), the largest and smallest group, and the median time
of each path: "xla" (jaxinfer.models.moe.moe through jax.lax.ragged_dot), "pallas" (the same
through pallas_kernels.grouped_matmul; interpret mode on a CPU, so not a timing there), "loop"
(every token through every expert, masked: moe.reference_moe) and "gather" (each (token, expert)
pair with its expert's weights gathered: the weights read once per pair). Writes JSON to --out.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxinfer import memory
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models import moe
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.family import ACTIVATIONS

from . import common
from .common import environment, median_call_time

FLAGS = flags.FLAGS
for _name in ("out", "runs", "calls", "dtype"):
    flags.declare_key_flag(_name)
RUNS = 5
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts per layer (E).")
_TOP_K = flags.DEFINE_integer("experts_per_token", 2, "Experts per token (k).")
_HIDDEN = flags.DEFINE_integer("moe_hidden", 512, "Hidden size (D).")
_FFN = flags.DEFINE_integer("moe_ffn", 1024, "Each expert's intermediate size (F).")
_TOKENS = flags.DEFINE_list("tokens", ["1", "8", "64", "512"], "Tokens per step to time.")
_PATHS = flags.DEFINE_list("paths", ["xla", "loop", "gather"], "Paths to time: xla, pallas, loop, gather.")
PATHS = ("xla", "pallas", "loop", "gather")


def gather_moe(family, cfg, lp, h):
    """Each (token, expert) pair through its expert's weights, gathered per pair (einsum over the
    gathered (N k, D, F) weights): the arithmetic of `moe`, the weights read once per pair."""
    D = h.shape[-1]
    x = h.reshape(-1, D)
    weights, experts = moe.route(cfg, lp["router"], x)  # (N, k)
    act = ACTIVATIONS[family.activation]
    g = jnp.einsum("nd,nkdf->nkf", x, lp["experts_gate"][experts])
    u = jnp.einsum("nd,nkdf->nkf", x, lp["experts_up"][experts])
    y = jnp.einsum("nkf,nkfd->nkd", act(g) * u, lp["experts_down"][experts])
    return jnp.einsum("nkd,nk->nd", y, weights).reshape(h.shape)


def layer_config() -> ModelConfig:
    for name, value in (("experts", _EXPERTS.value), ("experts_per_token", _TOP_K.value),
                        ("moe_hidden", _HIDDEN.value), ("moe_ffn", _FFN.value)):
        if value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    if _TOP_K.value > _EXPERTS.value:
        raise ValueError(f"--experts_per_token={_TOP_K.value} must be <= --experts={_EXPERTS.value}")
    unknown = sorted(set(_PATHS.value) - set(PATHS))
    if unknown:
        raise ValueError(f"--paths: {unknown} are not among {list(PATHS)}")
    return ModelConfig(model_type="mixtral", vocab_size=16, hidden_size=_HIDDEN.value, intermediate_size=_FFN.value,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=_HIDDEN.value, num_experts=_EXPERTS.value,
                       experts_per_token=_TOP_K.value)


def main(argv):
    del argv
    cfg = layer_config()
    tokens = [int(t) for t in _TOKENS.value]
    if min(tokens) < 1:
        raise ValueError(f"--tokens={_TOKENS.value}: every count must be >= 1")
    family = family_lib.of(cfg)
    dtype = jnp.dtype(FLAGS.dtype)
    params = model_lib.init_params(cfg, jax.random.key(0), dtype=dtype, std=0.05)
    lp = {k: v[0] for k, v in params["layers"].items() if k in ("router", "experts_gate", "experts_up", "experts_down")}
    impls = {"xla": model_lib.dense_projection(model_lib.Impl(matmul="xla")),
             "pallas": model_lib.dense_projection(model_lib.Impl(matmul="pallas"))}
    fns = {"xla": jax.jit(lambda lp, h: moe.moe(family, cfg, lp, h, impls["xla"])),
           "pallas": jax.jit(lambda lp, h: moe.moe(family, cfg, lp, h, impls["pallas"])),
           "loop": jax.jit(lambda lp, h: moe.reference_moe(family, cfg, lp, h)),
           "gather": jax.jit(lambda lp, h: gather_moe(family, cfg, lp, h))}
    runs = common.value_or("runs", RUNS)
    rows = []
    for n in tokens:
        h = jax.random.normal(jax.random.key(n), (n, cfg.hidden_size), dtype)
        _, experts = moe.route(cfg, lp["router"], h)
        counts = np.bincount(np.asarray(experts).reshape(-1), minlength=cfg.num_experts)
        row = dict(tokens=n, experts_touched=int((counts > 0).sum()),
                   experts_touched_uniform=memory.experts_touched(cfg, n), largest_group=int(counts.max()),
                   smallest_group=int(counts.min()), ms={}, compile_s={})
        reference = None
        for path in _PATHS.value:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fns[path](lp, h))
            row["compile_s"][path] = time.perf_counter() - t0
            reference = out if reference is None else reference
            scale = float(jnp.max(jnp.abs(reference.astype(jnp.float32)))) or 1.0
            row.setdefault("max_abs_diff_from_first", {})[path] = float(
                jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32)))) / scale
            row["ms"][path] = median_call_time(fns[path], [(lp, h)], runs, FLAGS.calls) * 1e3
        rows.append(row)
    result = dict(environment=environment(__name__), experts=cfg.num_experts, top_k=cfg.experts_per_token,
                  hidden=cfg.hidden_size, ffn=cfg.intermediate_size, dtype=FLAGS.dtype, results=rows)
    if FLAGS.out:
        common.write_json(FLAGS.out, result)
    print(f"MoE MLP on {jax.devices()[0].device_kind}: E={cfg.num_experts}, k={cfg.experts_per_token}, "
          f"D={cfg.hidden_size}, F={cfg.intermediate_size}, {FLAGS.dtype}; median of {runs} runs of {FLAGS.calls} calls")
    print(f"{'tokens':>7} {'touched':>8} {'uniform':>8} {'groups':>9} " + " ".join(f"{p + ' ms':>11}" for p in _PATHS.value))
    for r in rows:
        print(f"{r['tokens']:>7} {r['experts_touched']:>8} {r['experts_touched_uniform']:>8.1f} "
              f"{r['smallest_group']:>4}-{r['largest_group']:<4} " + " ".join(f"{r['ms'][p]:>11.3f}" for p in _PATHS.value))


if __name__ == "__main__":
    common.run(main)
