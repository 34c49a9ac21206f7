# Per-program compile time of the tiny engine's warmup (as bench_batching's skewed run): jax's compile log.
import logging, re, sys, time, io
import jax
jax.config.update("jax_log_compiles", True)
buf = io.StringIO()
h = logging.StreamHandler(buf); h.setLevel(logging.DEBUG)
for name in ("jax._src.interpreters.pxla", "jax._src.dispatch", "jax"):
    lg = logging.getLogger(name); lg.addHandler(h); lg.setLevel(logging.DEBUG)
import jaxinfer as ji
m = ji.load_model("tiny")
cfg = ji.EngineConfig(max_batch=8) if hasattr(ji, "EngineConfig") else None
eng = ji.Engine(m, cfg) if cfg is not None else ji.Engine(m, max_batch=8)
t0 = time.perf_counter()
n = eng.warmup(max_prompt_len=32, max_len=400)
print("warmup", n, round(time.perf_counter() - t0, 2))
tot = {}
for line in buf.getvalue().splitlines():
    mm = re.search(r"Finished XLA compilation of (.*?) in ([0-9.e-]+) sec", line)
    if mm:
        k = mm.group(1)[:60]; tot.setdefault(k, []).append(float(mm.group(2)))
    mm = re.search(r"Finished tracing \+ transforming (.*?) for pjit in ([0-9.e-]+) sec", line)
    if mm:
        k = "trace " + mm.group(1)[:50]; tot.setdefault(k, []).append(float(mm.group(2)))
for k, v in sorted(tot.items(), key=lambda kv: -sum(kv[1]))[:14]:
    print(f"{sum(v):7.2f} s  {len(v):3d}x  {k}")
