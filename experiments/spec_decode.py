"""Speculative decoding, measured: method x k x temperature x batch size against plain decoding on
the same engine, the same prompts, in the same run.

  python -m jaxinfer.experiments.spec_decode                                      # the shipped tiny pair
  python -m jaxinfer.experiments.spec_decode --methods=eagle,draft --ks=2,4,6 --temperatures=0,0.7 --batch_sizes=1,8
  python -m jaxinfer.experiments.spec_decode --model=random:llama3_8b --dtype=bfloat16 --methods=synthetic --spec_accept=0.8
  python -m jaxinfer.experiments.spec_decode --methods=eagle,eagle_tree --spec_tree_top_k=2 --spec_tree_depth=6 --ks=4,8

Prompts are held-out text in the model's tokens. Each configuration runs the prompts once to
compile; then --runs rounds each run every configuration once, in turn (so a change in the
machine's load reaches them all alike), and each configuration's median TPOT run is reported
(the engine keeps batch_size requests running), with its best TPOT and the speedup of best over
best (on a shared machine the run least disturbed by other work), and the process's CPU time per
generated token (all threads; much less sensitive to other jobs than wall time, but blind to
parallelism) with the speedup in it. Reported: tokens emitted per target pass (the
bonus token counted, as EAGLE's papers count it), the acceptance rate (accepted / drafted; for a
tree, accepted path tokens / tree tokens verified), target passes per generated token, the share of
wall time spent drafting, TPOT, throughput, the speedup in TPOT over --methods=none at the same
temperature and batch size, and beside it the ideal speedup tokens per pass / (1 + k x draft cost),
draft cost being one drafted token's time over a plain decode step's (the measured drafting time per
verify call over k x plain TPOT): what the method would reach if a verify pass cost what a decode
step does and nothing else were added. The synthetic method (a stand-in drafter accepted with
probability --spec_accept, drafting for free) shows the engine's own overhead at that acceptance.
Method eagle_tree (eagle3_tree) is EAGLE (EAGLE-3) with the draft tree of the --spec_tree_* flags (k: the tree's tokens);
eagle3:random is a randomly initialised EAGLE-3 head of the model's shape accepted at --spec_accept:
the true drafting cost at a set acceptance, for a model with no trained head (not lossless);
METHOD:DIR names a drafter directory for a method (default: the shipped one), e.g.
  python -m jaxinfer.experiments.spec_decode --model=smollm2-135m --methods=eagle:runs/eagle,medusa:runs/medusa,ngram
"""

from __future__ import annotations

import itertools
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import flags
from tqdm.auto import tqdm

import jaxinfer as ji
from jaxinfer import data
from jaxinfer.speculative import eagle3

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["ngram", "draft", "medusa", "eagle"], "Methods to compare with plain decoding "
                  "(eagle_tree, eagle3_tree: with the --spec_tree_* draft tree; METHOD:DIR: with the drafter in DIR).")
flags.DEFINE_list("ks", ["5"], "Drafted tokens per pass (k) to sweep.")
flags.DEFINE_list("temperatures", ["0"], "Sampling temperatures to sweep (0: greedy).")
flags.DEFINE_integer("num_prompts", 8, "Held-out prompts per configuration.")
PROMPT_LEN, MAX_TOKENS = 32, 64  # defaults: prompt tokens (BOS included), tokens generated (EOS ignored)
RUNS = 1  # default measured rounds
for _name in ("model", "dtype", "dequantize", "seed", "out", "batch_sizes", "spec_accept", "spec_tree_top_k", "spec_tree_depth",
              "spec_tree_temperature", "attention", "matmul", "overlap", "prompt_len", "max_tokens", "plot", "runs",
              "tp"):
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


_RANDOM_HEADS: dict[str, str] = {}
RANDOM_DRAFT_VOCAB = 32000  # the published EAGLE3-LLaMA3.1-Instruct-8B head's draft vocabulary


def random_head(model) -> str:
    """eagle3:random: a randomly initialised EAGLE-3 head of the model's shape (bfloat16), written
    once per run to a temporary directory."""
    if model.name not in _RANDOM_HEADS:
        path = tempfile.mkdtemp(prefix="jaxinfer-eagle3-random-")
        _RANDOM_HEADS[model.name] = eagle3.write_random(path, model.config, RANDOM_DRAFT_VOCAB, dtype=ml_dtypes.bfloat16)
    return _RANDOM_HEADS[model.name]


def spec_config(method: str, k: int, model=None) -> ji.SpeculativeConfig | None:
    """A --methods entry's config: a method, METHOD_tree (a method that drafts trees, with the
    --spec_tree_* tree), or either with :DIR, its drafter directory; eagle3:random, a random head
    of the model's shape accepted at --spec_accept (its drafting cost at that acceptance; not
    lossless). Without a model, the config only (checked, nothing written)."""
    method, _, draft = method.partition(":")
    if draft == "random":
        if method != "eagle3":
            raise ValueError(f"--methods={method}:random: a random head (timed at --spec_accept) is for eagle3 only")
        return ji.SpeculativeConfig(method=method, num_tokens=k, draft=random_head(model) if model else "random",
                                    accept=FLAGS.spec_accept)
    if method.endswith("_tree"):
        tree = common.tree_config()
        if tree is None:
            raise ValueError(f"--methods={method} needs --spec_tree_top_k >= 1")
        return common.spec_config(method.removesuffix("_tree"), k, draft, tree=tree)
    return common.spec_config(method, k, draft, accept=FLAGS.spec_accept)


def measure(model, prompts, method: str, k: int, temperature: float, batch: int) -> dict:
    """One run of the prompts on a new engine (the programs compiled already, by an earlier run)."""
    config = ji.EngineConfig(max_batch=batch, attention=FLAGS.attention, matmul=FLAGS.matmul, overlap=FLAGS.overlap,
                             tp=FLAGS.tp, speculative=spec_config(method, k, model))
    params = [ji.SamplingParams(max_tokens=common.value_or("max_tokens", MAX_TOKENS), temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    engine = ji.Engine(model, config)
    t0, cpu0 = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    m = engine.metrics()
    generated = sum(len(o.token_ids) for o in outs)
    row = {"method": method, "k": k if method != "none" else 0, "temperature": temperature, "batch": batch,
           "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_token": 1e3 * cpu / generated, "generated_tokens": generated,
           "throughput_tok_s": generated / wall,
           "tpot_s": float(np.mean([o.metrics["tpot_s"] for o in outs])),
           "ttft_s": float(np.mean([o.metrics["ttft_s"] for o in outs]))}
    if method != "none":
        row.update(tokens_per_pass=m["spec_tokens_per_pass"], acceptance_rate=m["spec_acceptance_rate"],
                   passes_per_token=m["spec_passes"] / max(m["spec_emitted"], 1), draft_share=m["spec_draft_s"] / wall,
                   draft_s_per_call=m["spec_draft_s"] / max(m["spec_calls"], 1))
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_tokens) = plt.subplots(1, 2, figsize=(9, 3.5))
    for (method, temperature, batch), group in itertools.groupby(
            sorted((r for r in rows if r["method"] != "none"), key=lambda r: (r["method"], r["temperature"], r["batch"],
                                                                              r["k"])),
            key=lambda r: (r["method"], r["temperature"], r["batch"])):
        group = list(group)
        label = f"{method} T={temperature:g} b={batch}"
        ks = [r["k"] for r in group]
        line, = ax.plot(ks, [r["speedup_cpu"] for r in group], "o-", label=label)
        ax.plot(ks, [r["speedup"] for r in group], "x", color=line.get_color())
        ax_tokens.plot(ks, [r["tokens_per_pass"] for r in group], "o-", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("k (tokens drafted per pass)")
    ax.set_ylabel("speedup over plain decoding\n(o-: CPU time per token, x: median TPOT)")
    ax_tokens.set_xlabel("k (tokens drafted per pass)")
    ax_tokens.set_ylabel("tokens per target pass (bonus counted)")
    ax_tokens.legend(fontsize=7)
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
    if common.value_or("runs", RUNS) < 1:
        raise ValueError(f"--runs={FLAGS.runs} must be >= 1")
    for method in FLAGS.methods:
        spec_config(method, 1)  # a bad method name fails here, before any work
        name, _, draft = method.partition(":")
        if draft != "random":
            common.check_draft(name.removesuffix("_tree"), draft, f"--methods={method}")
    if FLAGS.plot:
        common.require("--plot", "matplotlib")
    model = common.load_bench_model(FLAGS.model, FLAGS.dtype)
    prompts = prompts_for(model)
    grid = [("none", 0, t, b) for t in temperatures for b in batches]
    grid += [(m, k, t, b) for m in FLAGS.methods for k in ks for t in temperatures for b in batches]
    t0 = time.perf_counter()
    for point in tqdm(grid, desc="compile", unit="config"):
        measure(model, prompts, *point)
    compile_s = time.perf_counter() - t0
    runs = [[] for _ in grid]
    for _ in tqdm(range(common.value_or("runs", RUNS)), desc="rounds", unit="round"):
        for point, done in zip(grid, runs):
            done.append(measure(model, prompts, *point))
    rows = []
    for done in runs:
        cpu = sorted(r["cpu_ms_per_token"] for r in done)
        done.sort(key=lambda r: r["tpot_s"])
        rows.append({**done[len(done) // 2], "tpot_runs_s": [r["tpot_s"] for r in done], "tpot_best_s": done[0]["tpot_s"],
                     "cpu_ms_per_token": cpu[len(cpu) // 2], "cpu_ms_per_token_runs": cpu})
    base = {(r["temperature"], r["batch"]): r for r in rows if r["method"] == "none"}
    for r in rows:
        none = base[(r["temperature"], r["batch"])]
        plain = none["tpot_s"]
        r["speedup"] = plain / r["tpot_s"] if r["tpot_s"] else 0.0
        r["speedup_best"] = none["tpot_best_s"] / r["tpot_best_s"] if r["tpot_best_s"] else 0.0
        r["speedup_cpu"] = none["cpu_ms_per_token"] / r["cpu_ms_per_token"] if r["cpu_ms_per_token"] else 0.0
        if r["method"] != "none":
            r["draft_cost"] = r["draft_s_per_call"] / (max(r["k"], 1) * plain)
            r["ideal_speedup"] = r["tokens_per_pass"] / (1 + r["k"] * r["draft_cost"])
    metrics = {f"{r['method']}/k={r['k']}/T={r['temperature']:g}/b={r['batch']}": r for r in rows}
    if len(rows) == 2:  # one configuration against plain decoding (a sweep point): its figures unprefixed too
        metrics.update(rows[1])
    record = common.record(__name__, metrics, results=rows)
    record["compile_s"] = compile_s
    print(f"\n{model.name} on {record['env']['device']}: {len(prompts)} held-out prompts of "
          f"{common.value_or('prompt_len', PROMPT_LEN)} tokens, {common.value_or('max_tokens', MAX_TOKENS)} generated each; "
          f"compile runs {compile_s:.1f} s, median of {len(runs[0])} measured run(s)")
    header = ("method", "k", "temp", "batch", "tok/pass", "accept", "pass/tok", "draft %", "TPOT ms", "tok/s", "speedup",
              "best ms", "best sp", "cpu ms", "cpu sp", "ideal")
    print(" ".join(f"{h:>9}" for h in header))
    for r in rows:
        spec = r["method"] != "none"
        cells = [r["method"], r["k"], f"{r['temperature']:g}", r["batch"],
                 f"{r['tokens_per_pass']:.2f}" if spec else "-", f"{r['acceptance_rate']:.3f}" if spec else "-",
                 f"{r['passes_per_token']:.3f}" if spec else "-", f"{100 * r['draft_share']:.1f}" if spec else "-",
                 f"{r['tpot_s'] * 1e3:.2f}", f"{r['throughput_tok_s']:.0f}", f"{r['speedup']:.2f}x",
                 f"{r['tpot_best_s'] * 1e3:.2f}", f"{r['speedup_best']:.2f}x", f"{r['cpu_ms_per_token']:.2f}",
                 f"{r['speedup_cpu']:.2f}x", f"{r['ideal_speedup']:.2f}x" if spec else "-"]
        print(" ".join(f"{c:>9}" for c in cells))
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.plot:
        plot(rows, FLAGS.plot)
        print(f"wrote {FLAGS.plot}")


def cli() -> None:
    """The `jaxinfer-spec-decode` console script (the same as python -m jaxinfer.experiments.spec_decode)."""
    common.run(main)


if __name__ == "__main__":
    cli()
