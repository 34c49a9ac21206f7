import cProfile, pstats, sys, time, io
import jaxinfer as ji
from experiments import bench_batching  # noqa: just for parity of imports
m = ji.load_model("tiny")
eng = ji.Engine(m, ji.EngineConfig(max_batch=8))
import numpy as np
rng = np.random.default_rng(0)
outs = np.minimum(np.maximum(1, rng.lognormal(np.log(64), 1.2, 64).astype(int)), 400)
prompts = [rng.integers(3, 250, 32).tolist() for _ in outs]
eng.warmup(max_prompt_len=32, max_len=432)
def run():
    for p, o in zip(prompts, outs):
        eng.add_request(p, ji.SamplingParams(max_tokens=int(o), temperature=0.0, ignore_eos=True))
    n = 0
    while eng.has_unfinished():
        eng.step(); n += 1
    return n
run()  # replay once
t0 = time.perf_counter(); steps = run(); wall = time.perf_counter() - t0
print("steps", steps, "wall", round(wall, 3), "tok/s", round(int(outs.sum()) / wall))
pr = cProfile.Profile(); pr.enable(); run(); pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[:6000])
