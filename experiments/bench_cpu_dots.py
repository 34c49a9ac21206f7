"""Times the XLA CPU backend's matrix products the way a decoder lays them out: by dtype, by the
number of rows (tokens), and by how the layers' weights are held. A probe for the bfloat16 CPU path.

  python -m experiments.bench_cpu_dots                              # SmolLM2's 576 x 1536, 30 layers
  python -m experiments.bench_cpu_dots --dot_rows=1,2,8,32 --dim=576 --hidden=1536 --layers=30

Cases, each compiled once, then the median over --runs of --calls back-to-back calls:
  one           x (M, D) @ w (D, F), accumulated in float32 (preferred_element_type)
  stacked_scan  D x D weights of L layers stacked (L, D, D), lax.scan over them: x <- x @ w[l]
  stacked_loop  the same stack, a Python loop over w[l] (static slices)
  list_loop     L separate (D, D) arrays, a Python loop
for float32, bfloat16 and int8 operands (the product cast back to the operand dtype; int8's summed
in int32 and shifted back into int8's range, a requantisation's cost). Each case records how many
weight-shaped float32 / int32 `convert`s its compiled program holds: a product the CPU does not
compute natively converts its operands first (for a stacked weight in a scan: the whole stack, each
call). The engine multiplies one half-precision or int8 row as two (matmul.dense, act_formats).
Writes a JSON to --out and prints a table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

from . import common
from .common import environment, median_call_time

FLAGS = flags.FLAGS
for _name in ("out", "runs", "calls"):
    flags.declare_key_flag(_name)
RUNS, CALLS = 5, 20
_ROWS = flags.DEFINE_list("dot_rows", ["1", "2", "8", "32"], "Rows (tokens) M of x.")
_DIM = flags.DEFINE_integer("dim", 576, "Model width D.")
_HIDDEN = flags.DEFINE_integer("hidden", 1536, "The `one` case's output width F (an MLP's).")
_LAYERS = flags.DEFINE_integer("layers", 30, "Layers L of the stacked and list cases.")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


def _step(x, w, dtype):
    if dtype == jnp.int8:
        return jnp.clip(jnp.dot(x, w, preferred_element_type=jnp.int32) >> 12, -127, 127).astype(dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype)


def cases(dtype):
    """name -> (function, its arguments builder (M, D, F, L))."""

    def loop(x, ws):
        for i in range(ws.shape[0]):
            x = _step(x, ws[i], dtype)
        return x

    def list_loop(x, ws):
        for w in ws:
            x = _step(x, w, dtype)
        return x

    return {
        "one": (lambda x, w: _step(x, w, dtype), lambda M, D, F, L: (jnp.ones((M, D), dtype), jnp.ones((D, F), dtype))),
        "stacked_scan": (lambda x, ws: jax.lax.scan(lambda h, w: (_step(h, w, dtype), None), x, ws)[0],
                         lambda M, D, F, L: (jnp.ones((M, D), dtype), jnp.ones((L, D, D), dtype))),
        "stacked_loop": (loop, lambda M, D, F, L: (jnp.ones((M, D), dtype), jnp.ones((L, D, D), dtype))),
        "list_loop": (list_loop, lambda M, D, F, L: (jnp.ones((M, D), dtype),
                                                      [jnp.ones((D, D), dtype) for _ in range(L)])),
    }


def main(argv):
    del argv
    rows = [int(r) for r in _ROWS.value]
    for name, value in (("dim", _DIM.value), ("hidden", _HIDDEN.value), ("layers", _LAYERS.value),
                        ("calls", common.value_or("calls", CALLS)), ("runs", common.value_or("runs", RUNS)),
                        *(("dot_rows", r) for r in rows)):
        if value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    runs, calls = common.value_or("runs", RUNS), common.value_or("calls", CALLS)
    results = []
    for M in rows:
        for dtype_name, dtype in DTYPES.items():
            for case, (fn, make) in cases(dtype).items():
                args = make(M, _DIM.value, _HIDDEN.value, _LAYERS.value)
                jitted = jax.jit(fn)
                text = jitted.lower(*args).compile().as_text()
                ms = 1e3 * median_call_time(jitted, [args], runs=runs, calls=calls)
                D, F, L = _DIM.value, _HIDDEN.value, _LAYERS.value
                weights = [f"{t}[{shape}]" for t in ("f32", "s32") for shape in (f"{D},{D}", f"{D},{F}", f"{L},{D},{D}")]
                converted = sum(1 for line in text.splitlines() if "convert" in line and (" = f32[" in line or " = s32[" in line)
                                and any(w in line.split("=", 1)[1].split("(")[0] for w in weights))
                results.append({"rows": M, "dtype": dtype_name, "case": case, "ms": ms, "weight_converts": converted})
    out = {"environment": environment(__name__), "dim": _DIM.value, "hidden": _HIDDEN.value,
           "layers": _LAYERS.value, "results": results}
    if FLAGS.out:
        common.write_json(FLAGS.out, out)
    print(f"{'M':>3} {'case':>13} {'float32 ms':>11} {'bfloat16 ms':>12} {'int8 ms':>8} {'weight converts (bf16, int8)':>29}")
    by = {(r["rows"], r["case"], r["dtype"]): r for r in results}
    for M in rows:
        for case in cases(jnp.float32):
            f, b, i = (by[(M, case, d)] for d in DTYPES)
            converts = f"{b['weight_converts']}, {i['weight_converts']}"
            print(f"{M:>3} {case:>13} {f['ms']:>11.3f} {b['ms']:>12.3f} {i['ms']:>8.3f} {converts:>29}")


if __name__ == "__main__":
    common.run(main)
