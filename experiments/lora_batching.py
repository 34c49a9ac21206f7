"""Multi-LoRA batching: one batch serving many LoRA adapters over a shared base model, against the
base model alone in the same run.

  python -m jaxinfer.experiments.lora_batching --adapters=1,4,16,64,256 --max_adapters=16
  python -m jaxinfer.experiments.lora_batching --adapters=64 --composition=distinct --num_requests=64   # a slot each

For each point (number of adapters N, rank, batch composition), N random adapters (on --targets,
N(0, 0.02) weights) are written in PEFT's layout (adapter_config.json + adapter_model.safetensors)
and added to an engine with --max_adapters device slots (0: one per adapter) from those files.
The workload: --num_requests prompts of --prompt_len random tokens, all at once, each generating
--output_len tokens (EOS ignored), max_batch = num_requests; request i runs under an adapter drawn
by --composition:
  uniform   uniformly from the N adapters
  zipf      P(adapter k) ~ 1 / k^zipf_a: a few popular adapters and a long tail
  distinct  adapter i mod N (every request its own when N >= num_requests)
With fewer slots than the adapters a batch asks for, requests wait for a slot and slots are swapped
(least recently used first): the swaps and their time are reported, not hidden.

The base model (no adapters) serves the same workload in the same run. Each engine serves it once
unmeasured first (compiling its programs: that time is printed apart), then --runs timed runs
alternate base and LoRA, and medians are reported: throughput (generated tokens/s), mean TPOT, the
LoRA / base throughput ratio (the median over base-then-LoRA run pairs), slot loads and evictions per run and their time, the adapters' memory (device
slots, host store). Writes a JSON to --out and a plot to --plot, and prints a table.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import flags

import jaxinfer as ji
from jaxinfer import lora

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("adapters", ["1", "4", "16", "64", "256"], "Numbers of adapters to serve (a point each).")
flags.DEFINE_list("ranks", ["16"], "LoRA ranks (a point each).")
flags.DEFINE_list("composition", ["uniform", "zipf", "distinct"], "Batch compositions (a point each): uniform, "
                  "zipf, distinct.")
flags.DEFINE_float("zipf_a", 1.0, "Exponent of the zipf composition.")
flags.DEFINE_list("targets", ["q_proj", "k_proj", "v_proj", "o_proj"], "Projections the adapters adapt (PEFT "
                  "names: q_proj ... down_proj), or all-linear.")
flags.DEFINE_string("adapter_dir", "", "Write the adapters here and keep them ('' = a temporary directory).")
PROMPT_LEN = 48  # default --prompt_len
# --max_batch is not one of them: a run batches all --num_requests.
for _name in ("model", "dtype", "seed", "out", "runs", "num_requests", "prompt_len", "output_len", "plot",
              *(f for f in common.ENGINE_FLAGS if f != "max_batch"), *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)

RUNS = 3  # default timed runs per engine and point
COMPOSITIONS = ("uniform", "zipf", "distinct")
_PEFT_NAMES = {path.split(".")[-1]: name for name, path in lora.MODULES.items()}  # q_proj -> wq


def check_flags() -> dict:
    """Refuse bad flags before any work; returns the parsed lists."""
    parsed = {}
    for name in ("adapters", "ranks"):
        try:
            parsed[name] = [int(v) for v in FLAGS[name].value]
        except ValueError:
            raise ValueError(f"--{name}={','.join(FLAGS[name].value)}: not a list of integers") from None
        if not parsed[name] or min(parsed[name]) < 1:
            raise ValueError(f"--{name}={','.join(FLAGS[name].value)}: every value must be >= 1")
    if max(parsed["ranks"]) > FLAGS.max_lora_rank:
        raise ValueError(f"--ranks={','.join(FLAGS.ranks)} has a rank over --max_lora_rank={FLAGS.max_lora_rank}")
    bad = [c for c in FLAGS.composition if c not in COMPOSITIONS]
    if bad or not FLAGS.composition:
        raise ValueError(f"--composition: {bad[0] if bad else 'empty'!r} is not one of {', '.join(COMPOSITIONS)}")
    if FLAGS.targets == ["all-linear"]:
        parsed["projections"] = lora.PROJECTIONS
    else:
        bad = [t for t in FLAGS.targets if t not in _PEFT_NAMES]
        if bad or not FLAGS.targets:
            raise ValueError(f"--targets: {bad[0] if bad else 'empty'!r} is not all-linear or one of "
                             f"{', '.join(_PEFT_NAMES)}")
        parsed["projections"] = tuple(p for p in lora.PROJECTIONS if lora.MODULES[p].split(".")[-1] in FLAGS.targets)
    for name in ("num_requests", "prompt_len", "output_len"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1")
    if FLAGS.max_adapters < 0:
        raise ValueError(f"--max_adapters={FLAGS.max_adapters} must be >= 0")
    if not FLAGS.zipf_a > 0:
        raise ValueError(f"--zipf_a={FLAGS.zipf_a} must be > 0")
    if FLAGS.runs is not None and FLAGS.runs < 1:
        raise ValueError(f"--runs={FLAGS.runs} must be >= 1")
    if FLAGS.plot:
        common.require("--plot", "matplotlib")
    if FLAGS.adapter_dir and not os.path.isdir(FLAGS.adapter_dir):
        raise ValueError(f"--adapter_dir={FLAGS.adapter_dir} is not a directory")
    return parsed


def compose(composition: str, num_adapters: int, num_requests: int, rng, zipf_a: float = 1.0) -> list[int]:
    """The adapter index of each request."""
    if composition == "distinct":
        return [i % num_adapters for i in range(num_requests)]
    if composition == "uniform":
        return rng.integers(0, num_adapters, num_requests).tolist()
    p = 1.0 / np.arange(1, num_adapters + 1) ** zipf_a
    return rng.choice(num_adapters, size=num_requests, p=p / p.sum()).tolist()


def write_adapters(cfg, count: int, rank: int, projections, directory: str) -> list[str]:
    """`count` random adapters in PEFT's layout under directory; their paths."""
    paths = []
    for k in range(count):
        path = os.path.join(directory, f"r{rank}-{k}")
        if not os.path.exists(os.path.join(path, lora.adapter.WEIGHTS_FILE)):
            adapter = lora.random_adapter(cfg, rank, projections, seed=FLAGS.seed * 100_003 + rank * 1009 + k)
            lora.save_adapter(adapter, path)
        paths.append(path)
    return paths


def serve(engine: ji.Engine, prompts, names) -> dict:
    """One run of the workload; its throughput, TPOT and the slot traffic it caused."""
    before = engine.metrics()
    sp = ji.SamplingParams(max_tokens=FLAGS.output_len, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, sp, adapters=names)
    after = engine.metrics()
    return {"tok_s": engine.last_run["throughput_tok_s"], "wall_s": engine.last_run["wall_s"],
            "tpot_s": float(np.mean([o.metrics["tpot_s"] for o in outs])),
            **{k: after[k] - before[k] for k in ("lora_loads", "lora_evictions", "lora_swap_s")}}


def warm(engine: ji.Engine, prompts, names) -> float:
    """Serve once unmeasured (compiles the engine's programs); its seconds."""
    t0 = time.perf_counter()
    serve(engine, prompts, names)
    return time.perf_counter() - t0


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run_point(model, base, prompts, paths, rank, composition, rng) -> dict:
    n = len(paths)
    slots = FLAGS.max_adapters or n
    config = common.engine_config(max_batch=FLAGS.num_requests, max_adapters=slots)
    engine = ji.Engine(model, config)
    t0 = time.perf_counter()
    for k, path in enumerate(paths):
        engine.add_adapter(f"a{k}", path)
    load_s = time.perf_counter() - t0
    names = [f"a{k}" for k in compose(composition, n, len(prompts), rng, FLAGS.zipf_a)]
    compile_s = warm(engine, prompts, names)
    lora_runs, base_runs = [], []
    for _ in range(FLAGS.runs or RUNS):
        base_runs.append(serve(base, prompts, None))
        lora_runs.append(serve(engine, prompts, names))
    m = engine.metrics()
    row = {"adapters": n, "rank": rank, "composition": composition, "slots": slots,
           "distinct_in_batch": len(set(names)), "tok_s": median(lora_runs, "tok_s"),
           "base_tok_s": median(base_runs, "tok_s"), "tpot_s": median(lora_runs, "tpot_s"),
           "base_tpot_s": median(base_runs, "tpot_s"), "loads_per_run": median(lora_runs, "lora_loads"),
           "evictions_per_run": median(lora_runs, "lora_evictions"), "swap_s_per_run": median(lora_runs, "lora_swap_s"),
           "adapter_device_bytes": m["adapter_device_bytes"], "adapter_host_bytes": m["adapter_host_bytes"],
           "adapter_load_s": load_s, "compile_s": compile_s, "peak_running": engine.stats["peak_running"],
           "runs": lora_runs, "base_runs": base_runs}
    # Each LoRA run follows a base run: the ratio within pairs is robust to the machine's load drifting.
    row["ratio"] = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(lora_runs, base_runs))
    return row


def main(argv):
    del argv
    parsed = check_flags()
    model = common.load_bench_model(FLAGS.model, FLAGS.dtype)
    rng = np.random.default_rng(FLAGS.seed)
    prompt_len = common.value_or("prompt_len", PROMPT_LEN)
    prompts = rng.integers(0, model.config.vocab_size, (FLAGS.num_requests, prompt_len)).tolist()
    base = ji.Engine(model, common.engine_config(max_batch=FLAGS.num_requests, max_adapters=0))
    base_compile_s = warm(base, prompts, None)
    print(f"base model {model.name}: compiled and served once in {base_compile_s:.1f} s", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = FLAGS.adapter_dir or tmp
        for rank in parsed["ranks"]:
            paths = write_adapters(model.config, max(parsed["adapters"]), rank, parsed["projections"], directory)
            for n in parsed["adapters"]:
                for composition in FLAGS.composition:
                    row = run_point(model, base, prompts, paths[:n], rank, composition, rng)
                    results.append(row)
                    print(f"  {n} adapters, rank {rank}, {composition}: {row['tok_s']:.0f} tok/s vs base "
                          f"{row['base_tok_s']:.0f} ({row['ratio']:.2f}x); compile {row['compile_s']:.1f} s",
                          flush=True)
    record = {"config": {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])},
              "environment": common.environment("experiments.lora_batching"), "base_compile_s": base_compile_s,
              "projections": list(parsed["projections"]), "results": results}
    print_table(results, record["environment"]["device"], model.name)
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.plot:
        plot(results, FLAGS.plot)
        print(f"wrote {FLAGS.plot}")


def print_table(results: list[dict], device: str, model_name: str) -> None:
    print(f"\n{model_name}: {FLAGS.num_requests} requests at once, {common.value_or('prompt_len', PROMPT_LEN)} prompt + {FLAGS.output_len} "
          f"generated tokens each, adapters on {','.join(FLAGS.targets)}, lora_impl={ji.models.decoder.auto_impl(FLAGS.lora_impl)}, on {device}")
    header = ("adapters", "rank", "batch", "slots", "tok/s", "base tok/s", "vs base", "TPOT", "base TPOT",
              "loads/run", "evict/run", "swap/run", "slots MiB", "host MiB", "compile")
    print(" ".join(f"{h:>10}" for h in header))
    for r in results:
        row = [str(r["adapters"]), str(r["rank"]), r["composition"], str(r["slots"]), f"{r['tok_s']:.0f}",
               f"{r['base_tok_s']:.0f}", f"{r['ratio']:.2f}x", f"{r['tpot_s'] * 1e3:.2f}ms",
               f"{r['base_tpot_s'] * 1e3:.2f}ms", f"{r['loads_per_run']:.0f}", f"{r['evictions_per_run']:.0f}",
               f"{r['swap_s_per_run'] * 1e3:.0f}ms", f"{r['adapter_device_bytes'] / 2**20:.1f}",
               f"{r['adapter_host_bytes'] / 2**20:.1f}", f"{r['compile_s']:.1f}s"]
        print(" ".join(f"{c:>10}" for c in row))


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for rank in sorted({r["rank"] for r in results}):
        for composition in COMPOSITIONS:
            rows = [r for r in results if r["rank"] == rank and r["composition"] == composition]
            if rows:
                ax.plot([r["adapters"] for r in rows], [r["tok_s"] for r in rows], "o-",
                        label=f"{composition}, rank {rank}")
    ax.axhline(statistics.median(r["base_tok_s"] for r in results), color="k", ls="--", lw=1, label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters served")
    ax.set_ylabel("generated tokens/s")
    slots = sorted({r["slots"] for r in results})
    ax.set_title(f"{FLAGS.num_requests} requests at once, slots {','.join(map(str, slots))}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cli() -> None:
    """The `jaxinfer-lora-batching` console script (the same as python -m jaxinfer.experiments.lora_batching)."""
    common.run(main)


if __name__ == "__main__":
    cli()
