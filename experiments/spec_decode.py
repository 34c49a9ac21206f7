"""Speculative decoding, measured: method x k x temperature x batch size against plain decoding on
the same engine, the same prompts, in the same run.

  python -m experiments.spec_decode                                      # the shipped tiny pair
  python -m experiments.spec_decode --methods=eagle,draft --ks=2,4,6 --temperatures=0,0.7 --batch_sizes=1,8
  python -m experiments.spec_decode --model=random:llama3_8b --dtype=bfloat16 --methods=synthetic --spec_accept=0.8

Prompts are held-out text in the model's tokens. Each configuration runs the prompts once to
compile, then once measured (the engine keeps batch_size requests running). Reported: tokens
emitted per target pass (the bonus token counted, as EAGLE's papers count it), the acceptance rate
(accepted / drafted), target passes per generated token, the share of wall time spent drafting,
TPOT, throughput, and the speedup in TPOT over --methods=none at the same temperature and batch
size. The synthetic method (a stand-in drafter accepted with probability --spec_accept, drafting for
free) shows the speedup the engine itself reaches at that acceptance: compare it with the ideal
tokens per pass / (1 + k x draft cost).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from absl import flags
from tqdm.auto import tqdm

import jaxinfer as ji
from jaxinfer import data

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["ngram", "draft", "medusa", "eagle"], "Methods to compare with plain decoding.")
flags.DEFINE_list("ks", ["5"], "Drafted tokens per pass (k) to sweep.")
flags.DEFINE_list("temperatures", ["0"], "Sampling temperatures to sweep (0: greedy).")
flags.DEFINE_integer("num_prompts", 8, "Held-out prompts per configuration.")
PROMPT_LEN, MAX_TOKENS = 32, 64  # defaults: prompt tokens (BOS included), tokens generated (EOS ignored)
for _name in ("model", "dtype", "seed", "out", "batch_sizes", "spec_accept", "attention", "matmul", "prompt_len",
              "max_tokens", "plot", "tp"):
    flags.declare_key_flag(_name)


DEFAULT_LISTS = {"batch_sizes": ["1"]}  # defaults of the shared list flags


def _numbers(name: str, cast) -> list:
    try:
        values = [cast(v) for v in common.value_or(name, DEFAULT_LISTS.get(name))]
    except ValueError:
        raise ValueError(f"--{name}={','.join(FLAGS[name].value)}: not a list of numbers") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def prompts_for(model) -> list[list[int]]:
    if model.tokenizer is None:
        raise ValueError(f"--model={FLAGS.model} has no tokenizer: the prompts are held-out text in its tokens")
    stream = data.heldout_stream(model.tokenizer).ids
    bos = [] if model.tokenizer.bos_id is None else [model.tokenizer.bos_id]
    n = common.value_or("prompt_len", PROMPT_LEN)
    starts = np.random.default_rng(FLAGS.seed).integers(0, stream.size - n, size=FLAGS.num_prompts)
    return [(bos + stream[s : s + n].tolist())[:n] for s in starts]


def measure(model, prompts, method: str, k: int, temperature: float, batch: int) -> dict:
    config = ji.EngineConfig(max_batch=batch, attention=FLAGS.attention, matmul=FLAGS.matmul, tp=FLAGS.tp,
                             speculative=common.spec_config(method, k, accept=FLAGS.spec_accept))
    params = [ji.SamplingParams(max_tokens=common.value_or("max_tokens", MAX_TOKENS), temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    ji.Engine(model, config).generate(prompts, params)  # compiles what the measured run uses
    engine = ji.Engine(model, config)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    m = engine.metrics()
    generated = sum(len(o.token_ids) for o in outs)
    row = {"method": method, "k": k if method != "none" else 0, "temperature": temperature, "batch": batch,
           "wall_s": wall, "generated_tokens": generated, "throughput_tok_s": generated / wall,
           "tpot_s": float(np.mean([o.metrics["tpot_s"] for o in outs])),
           "ttft_s": float(np.mean([o.metrics["ttft_s"] for o in outs]))}
    if method != "none":
        row.update(tokens_per_pass=m["spec_tokens_per_pass"], acceptance_rate=m["spec_acceptance_rate"],
                   passes_per_token=m["spec_passes"] / max(m["spec_emitted"], 1), draft_share=m["spec_draft_s"] / wall)
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (method, temperature, batch), group in itertools.groupby(
            sorted((r for r in rows if r["method"] != "none"), key=lambda r: (r["method"], r["temperature"], r["batch"],
                                                                              r["k"])),
            key=lambda r: (r["method"], r["temperature"], r["batch"])):
        group = list(group)
        ax.plot([r["k"] for r in group], [r["speedup"] for r in group], "o-", label=f"{method} T={temperature} b={batch}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("k (tokens drafted per pass)")
    ax.set_ylabel("TPOT speedup over plain decoding")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    ks = _numbers("ks", int)
    temperatures = _numbers("temperatures", float)
    batches = _numbers("batch_sizes", int)
    for name, values in (("ks", ks), ("batch_sizes", batches)):
        if min(values) < 1:
            raise ValueError(f"--{name}: every value must be >= 1")
    if FLAGS.num_prompts < 1 or common.value_or("prompt_len", 1) < 1 or common.value_or("max_tokens", 1) < 1:
        raise ValueError("--num_prompts, --prompt_len and --max_tokens must be >= 1")
    for method in FLAGS.methods:
        common.spec_config(method, 1, accept=FLAGS.spec_accept)  # a bad method name fails here, before any work
    common.check_out(FLAGS.out)
    if FLAGS.plot:
        common.check_out(FLAGS.plot)
        common.require("matplotlib", "--plot", "plots")
    model = common.load_bench_model(FLAGS.model, FLAGS.dtype)
    prompts = prompts_for(model)
    grid = [("none", 0, t, b) for t in temperatures for b in batches]
    grid += [(m, k, t, b) for m in FLAGS.methods for k in ks for t in temperatures for b in batches]
    rows = [measure(model, prompts, *point) for point in tqdm(grid, desc="configurations", unit="config")]
    base = {(r["temperature"], r["batch"]): r["tpot_s"] for r in rows if r["method"] == "none"}
    for r in rows:
        r["speedup"] = base[(r["temperature"], r["batch"])] / r["tpot_s"] if r["tpot_s"] else 0.0
    metrics = {f"{r['method']}/k={r['k']}/T={r['temperature']:g}/b={r['batch']}": r for r in rows}
    if len(rows) == 2:  # one configuration against plain decoding (a sweep point): its figures unprefixed too
        metrics.update(rows[1])
    record = common.record(__name__, metrics, results=rows)
    print(f"\n{model.name} on {record['env']['device']}: {len(prompts)} held-out prompts of "
          f"{common.value_or('prompt_len', PROMPT_LEN)} tokens, {common.value_or('max_tokens', MAX_TOKENS)} generated each")
    header = ("method", "k", "temp", "batch", "tok/pass", "accept", "pass/tok", "draft %", "TPOT ms", "tok/s", "speedup")
    print(" ".join(f"{h:>9}" for h in header))
    for r in rows:
        spec = r["method"] != "none"
        cells = [r["method"], r["k"], f"{r['temperature']:g}", r["batch"],
                 f"{r['tokens_per_pass']:.2f}" if spec else "-", f"{r['acceptance_rate']:.3f}" if spec else "-",
                 f"{r['passes_per_token']:.3f}" if spec else "-", f"{100 * r['draft_share']:.1f}" if spec else "-",
                 f"{r['tpot_s'] * 1e3:.2f}", f"{r['throughput_tok_s']:.0f}", f"{r['speedup']:.2f}x"]
        print(" ".join(f"{c:>9}" for c in cells))
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.plot:
        plot(rows, FLAGS.plot)
        print(f"wrote {FLAGS.plot}")


if __name__ == "__main__":
    common.run(main)
