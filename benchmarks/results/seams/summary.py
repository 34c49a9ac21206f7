import glob, json, statistics, sys, os
d = sys.argv[1]
M = [("skewed", "throughput_tok_s", "tiny, skewed continuous batching: throughput (tok/s)"),
     ("skewed", "tpot_s/p50", "tiny, skewed: TPOT p50 (ms)"),
     ("skewed", "warmup_s", "tiny, skewed: warmup compile (s)"),
     ("skewed", "compiled_programs", "tiny, skewed: compiled programs"),
     ("skewed", "host_share", "tiny, skewed: host share of step time"),
     ("overhead", "engine_tpot_s", "tiny, batch 1: engine TPOT (ms)"),
     ("overhead", "bare_step_s", "tiny, batch 1: bare jitted step (ms)"),
     ("smol", "throughput_tok_s", "SmolLM2-135M, continuous batching: throughput (tok/s)"),
     ("smol", "tpot_s/p50", "SmolLM2-135M: TPOT p50 (ms)"),
     ("smol", "warmup_s", "SmolLM2-135M: warmup compile (s)"),
     ("peers", "jaxinfer/b=1/tokens_per_s", "SmolLM2-135M bench_peers, batch 1 (tok/s)"),
     ("peers", "jaxinfer/b=8/tokens_per_s", "SmolLM2-135M bench_peers, batch 8 (tok/s)")]
print("| measure | A: 6efe667 (before) per round | B: main per round | A median | B median | B/A |")
print("| --- | --- | --- | ---: | ---: | ---: |")
for bench, key, label in M:
    vals = {}
    for side in "AB":
        xs = []
        for f in sorted(glob.glob(f"{d}/{side}_{bench}_*.json")):
            v = json.load(open(f))["metrics"].get(key)
            if v is not None:
                xs.append(v * (1e3 if "tpot" in key or key == "bare_step_s" else 1))
        vals[side] = xs
    a, b = statistics.median(vals["A"]), statistics.median(vals["B"])
    fmt = lambda xs: ", ".join(f"{x:.4g}" for x in xs)
    print(f"| {label} | {fmt(vals['A'])} | {fmt(vals['B'])} | {a:.4g} | {b:.4g} | {b/a:.3f} |")
