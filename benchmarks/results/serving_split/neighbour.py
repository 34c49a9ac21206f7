"""In-process SmolLM2 closed loop (64 clients, 64 requests of 32 tokens, prompt 32) on CPU 0, with CPU 1 idle,
running a memory-streaming loop, or a pure-Python busy loop; TPOT and TTFT p50, alternating.

  python benchmarks/results/serving_split/neighbour.py   (from the repository root)
"""
import os
import statistics
import subprocess
import sys
import time

os.sched_setaffinity(0, {0})
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))  # the repository root
import dataclasses

import jaxinfer as ji
from experiments import bench_serving as bs
from jaxinfer.checkpoints.weights import load_model
from jaxinfer.quant import dequantize_params

model = load_model("smollm2-135m")
model = dataclasses.replace(model, params=dequantize_params(model.params))
engine = ji.Engine(model, ji.EngineConfig(max_batch=32, max_seq_len=128))
class R:
    def __init__(s, p, n): s.prompt, s.output_len, s.arrival_s = p, n, 0.0
wl = [R([(13 * i + j) % 40000 + 100 for j in range(32)], 32) for i in range(64)]
bs.run_in_process(engine, wl, 64)  # compile
NEIGH = {"idle": None,
         "memory": "import numpy as np, os\nos.sched_setaffinity(0, {1})\na = np.ones(64 << 20, np.float32); b = np.empty_like(a)\nwhile True: np.copyto(b, a)",
         "busy": "import os\nos.sched_setaffinity(0, {1})\nwhile True: pass"}
res = {k: [] for k in NEIGH}
for rep in range(2):
    for name, code in NEIGH.items():
        p = subprocess.Popen([sys.executable, "-c", code]) if code else None
        time.sleep(1)
        t = bs.run_in_process(engine, wl, 64)
        if p: p.kill(); p.wait()
        tpot = statistics.median(x["tpot_s"] for x in t) * 1e3
        ttft = statistics.median(x["ttft_s"] for x in t) * 1e3
        res[name].append((tpot, ttft))
        print(f"{name:7s} TPOT p50 {tpot:.1f} ms  TTFT p50 {ttft:.0f} ms", flush=True)
