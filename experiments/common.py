"""What every experiment shares: the flags they have in common (each defined once, so experiments
can be imported side by side, as the tests run them in one process), the engine's flags and the
EngineConfig they build, one error path, the run record, and timing.

An experiment's `main` is wrapped by `run(main)`: bad input (ValueError, and the ConfigError and
CheckpointError subclasses of it) ends the run with one `error: ...` line and exit status 2.

Scale-out: `--tp=N` runs the model tensor-parallel over the first N devices (EngineConfig(tp=N)).
On several hosts, start the same command on each with `--coordinator=HOST:PORT --num_processes=P
--process_id=I` (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): `run` calls
jax.distributed.initialize before main, so jax.devices() lists every host's devices.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import statistics
import sys
import time

import jax
from absl import app, flags

import jaxinfer as ji
from jaxinfer import memory, sharding
from jaxinfer.speculative import DRAFTERS

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "tiny", "A shipped model (tiny, tiny-draft) or a local HF checkpoint directory; "
                    "bench_batching also takes random:NAME, random weights shaped like configs/models/NAME.json.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Weights and activations dtype.")
flags.DEFINE_integer("seed", 0, "Seed of the run's random draws (workload, sampling, calibration).")
flags.DEFINE_string("dir", "", "The folder a report reads (sweep_report: a sweep's results.jsonl; gpu_report: a GPU "
                    "session's JSON files).")
flags.DEFINE_string("out", "", "Write the JSON result to this file ('' = do not write).")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "pallas"], "Attention implementation (auto: pallas on a GPU, "
                  "xla elsewhere; pallas runs interpreted on a CPU).")
flags.DEFINE_enum("matmul", "auto", ["auto", "xla", "pallas"], "How quantised weights are multiplied (pallas: dequantise "
                  "in the kernel, interpreted on a CPU).")
flags.DEFINE_integer("windows", 64, "Held-out evaluation windows.")
flags.DEFINE_integer("seq_len", 512, "Tokens per window.")
flags.DEFINE_bool("quick", False, "Tiny shapes and 2 runs of 2 calls: a smoke test that runs on a CPU.")
flags.DEFINE_bool("interpret", None, "Pallas interpret mode (default: on when there is no GPU).")
flags.DEFINE_integer("prompt_len", None, "Prompt tokens (default: the script's; bench_batching: the fixed value or "
                     "the mean of its distribution).")
flags.DEFINE_integer("max_tokens", None, "Tokens to generate per prompt (default: the script's).")
flags.DEFINE_string("plot", "", "Write the script's plot to this PNG ('' = no plot).")
flags.DEFINE_integer("runs", None, "Timed runs per variant; the median is reported (default: the script's).")
flags.DEFINE_integer("calls", 50, "Back-to-back calls per timed run.")
flags.DEFINE_list("batch_sizes", None, "Batch sizes to measure, one run each (default: the script's).")
flags.DEFINE_integer("num_requests", 32, "Requests in the workload.")
flags.DEFINE_integer("output_len", 48, "Tokens generated per request (bench_batching: the fixed value or the mean).")

# Training (train_tiny, train_drafter).
flags.DEFINE_string("out_dir", "", "Export directory (default runs/<script>; jaxinfer/assets replaces what ships).")
flags.DEFINE_string("ckpt_dir", "", "Orbax train-state checkpoints, resumed by a rerun (default /tmp/jaxinfer_<script>).")
flags.DEFINE_integer("steps", None, "Train steps (default: the script's).")
flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (AdamW, warmup then cosine decay to 10%).")
flags.DEFINE_integer("warmup_steps", 50, "Learning-rate warm-up steps.")
flags.DEFINE_integer("eval_windows", 64, "Held-out windows of seq_len for the final evaluation.")
flags.DEFINE_integer("ckpt_every", 100, "Save the train state every N steps.")
TRAIN_FLAGS = ("out_dir", "ckpt_dir", "steps", "batch_size", "lr", "warmup_steps", "eval_windows", "ckpt_every")

# The engine, flag by flag (EngineConfig's fields and defaults).
flags.DEFINE_enum("batching", "continuous", ["continuous", "static"], "Batching policy.")
flags.DEFINE_enum("kv_layout", "paged", ["paged", "contiguous"], "KV-cache layout.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("kv_budget_tokens", 0, "KV budget in tokens (0: room for max_batch full-length sequences).")
flags.DEFINE_integer("max_batch", 8, "Sequences running at once.")
flags.DEFINE_integer("max_tokens_per_step", 256, "Token budget per step.")
flags.DEFINE_bool("chunked_prefill", True, "Split prompts across steps.")
flags.DEFINE_bool("prefix_cache", True, "Reuse KV pages of identical prompt prefixes.")
flags.DEFINE_integer("decode_steps", 1, "Decode steps per host round trip when a step has no prompt work.")
flags.DEFINE_bool("overlap", True, "Dispatch the next decode call before reading the last one's tokens back.")
flags.DEFINE_integer("max_adapters", 0, "LoRA adapter slots on the device (0: no adapters; lora_batching: one slot per "
                     "adapter).")
flags.DEFINE_integer("max_lora_rank", 16, "The largest LoRA rank the slots take.")
flags.DEFINE_enum("lora_impl", "auto", ["auto", "xla", "pallas"], "How each token's LoRA delta is applied (pallas: BGMV/SGMV "
                  "kernels, interpreted on a CPU).")

flags.DEFINE_integer("tp", 1, "Tensor-parallel degree: the model and its KV cache split over the first tp devices "
                     "(every host's, with --coordinator; a CPU fakes devices with XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N). kv_capacity: plan per card at this tp.")
flags.DEFINE_string("coordinator", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                    "Multi-host: the coordinator's HOST:PORT (process 0's host); '' = one process.")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                     "Multi-host: processes in the run, one per host.")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", 0)), "Multi-host: this process's index.")

flags.DEFINE_string("kv_dtype", "", "KV-cache dtype: '' (the model's own), int8 or fp8 (quantised per token and "
                    "head, float32 scales); kv_capacity also takes float32, bfloat16, float16 (its default bfloat16).")

flags.DEFINE_enum("spec", "none", ["none", *DRAFTERS], "Speculative decoding method (none: plain decoding).")
flags.DEFINE_integer("spec_tokens", 5, "Tokens drafted per target pass (k).")
flags.DEFINE_string("spec_draft", "", "The drafter: a shipped name (tiny-draft, tiny-medusa, tiny-eagle) or a directory "
                    "('': the method's shipped one).")
flags.DEFINE_float("spec_accept", 0.8, "Acceptance probability of --spec=synthetic (a stand-in drafter, not lossless).")
flags.DEFINE_integer("spec_tree_top_k", 0, "EAGLE: draft a dynamic tree (EAGLE-2) expanding this many candidates per "
                     "step into this many children each, --spec_tokens of them verified (0: a chain).")
flags.DEFINE_integer("spec_tree_depth", 5, "EAGLE tree: its depth (expansion steps + 1).")
flags.DEFINE_float("spec_tree_temperature", 1.0, "EAGLE tree: temperature of the draft log-probabilities that rank "
                   "candidates (1: EAGLE-2's).")

ENGINE_FLAGS = ("batching", "kv_layout", "page_size", "kv_budget_tokens", "max_batch", "max_tokens_per_step",
                "chunked_prefill", "prefix_cache", "attention", "matmul", "decode_steps", "overlap", "kv_dtype",
                "max_adapters", "max_lora_rank", "lora_impl", "tp")
DISTRIBUTED_FLAGS = ("coordinator", "num_processes", "process_id")
SPEC_FLAGS = ("spec", "spec_tokens", "spec_draft", "spec_accept", "spec_tree_top_k", "spec_tree_depth",
              "spec_tree_temperature")
DEFAULT_DRAFTS = {"draft": "tiny-draft", "medusa": "tiny-medusa", "eagle": "tiny-eagle"}


def tree_config() -> ji.DraftTree | None:
    """The draft tree the --spec_tree_* flags describe (None: --spec_tree_top_k=0, a chain)."""
    if FLAGS.spec_tree_top_k == 0:
        return None
    return ji.DraftTree(top_k=FLAGS.spec_tree_top_k, depth=FLAGS.spec_tree_depth, temperature=FLAGS.spec_tree_temperature)


def spec_config(method: str, k: int, draft: str = "", accept: float = 0.8,
                tree: ji.DraftTree | None = None) -> ji.SpeculativeConfig | None:
    """The SpeculativeConfig of a method ("none": None), with the method's shipped drafter by default."""
    if method == "none":
        return None
    return ji.SpeculativeConfig(method=method, num_tokens=k, draft=draft or DEFAULT_DRAFTS.get(method),
                                accept=accept if method == "synthetic" else None, tree=tree)


def mesh():
    """The tensor-parallel mesh --tp asks for (the first tp devices), or None for tp=1."""
    return sharding.make_mesh(FLAGS.tp) if FLAGS.tp > 1 else None


def value_or(name: str, default):
    """A flag's value, or the script's default when it was left unset (None)."""
    value = FLAGS[name].value
    return default if value is None else value


def engine_config(**overrides) -> ji.EngineConfig:
    """The EngineConfig the engine and speculative flags describe (overrides win)."""
    values = {name: FLAGS[name].value for name in ENGINE_FLAGS}
    values["kv_budget_tokens"] = values["kv_budget_tokens"] or None
    values["kv_dtype"] = values["kv_dtype"] or None
    values["speculative"] = spec_config(FLAGS.spec, FLAGS.spec_tokens, FLAGS.spec_draft, FLAGS.spec_accept,
                                        tree_config())
    return ji.EngineConfig(**{**values, **overrides})


def run(main) -> None:
    """app.run(main), with bad input reported as one `error: ...` line and exit status 2."""

    def guarded(argv):
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU-probe line on a CPU
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            if FLAGS.coordinator:
                sharding.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
            main(argv)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)


def check_out(path: str) -> None:
    """Refuse, before any work, an output path whose directory is missing or not writable."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: the directory {folder} is not writable")


def require(module: str, flag: str, extra: str) -> None:
    """Refuse, before any work, a flag that needs a package that is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{flag} needs {module}: pip install 'jaxinfer[{extra}]'")


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested dicts of numbers -> one flat dict ("a/b/c": value); strings and lists are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (bool, int, float)) and not isinstance(value, str):
            out[name] = float(value)
    return out


def record(module: str, metrics: dict, **extra) -> dict:
    """Every experiment's JSON: `config` (the flags it ran with), `env` (where, when, how), `metrics`
    (flat: name -> number, nested names joined by "/", what sweeps tabulate) and any extra rows."""
    config = {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[module])}
    env = environment(module)
    ran = {name: ji.models.decoder.auto_impl(config[name]) for name in ("attention", "matmul", "lora_impl") if name in config}
    if ran:
        env["implementations"] = ran  # which path ran ("auto" resolved)
    return {"config": config, "env": env, "metrics": flatten(metrics), **extra}


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    print(f"wrote {path}")


def write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


def environment(module: str) -> dict:
    """When, where and how an experiment ran: date (UTC), device, backend, versions, command."""
    if module == "__main__":  # run as `python -m experiments.X`: the name it was run by
        module = getattr(sys.modules["__main__"].__spec__, "name", module)
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        python=sys.version.split()[0],
        command=" ".join([os.path.basename(sys.executable), "-m", module, *sys.argv[1:]]),
    )


def median_call_time(fn, arg_sets, runs: int, calls: int) -> float:
    """Median seconds per call over `runs` runs of `calls` back-to-back calls, cycling through
    arg_sets (several weight sets defeat the L2 cache). Each set is called once first (compile)."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def load_bench_model(name: str, dtype: str) -> ji.Model:
    """A shipped or local model, or random weights shaped like configs/models/NAME.json (or like
    the HF config.json at a path: random:/path/to/config.json)."""
    if not name.startswith("random:"):
        return ji.load_model(name, dtype=dtype)
    shape = name.split(":", 1)[1]
    path = shape if shape.endswith(".json") else os.path.join(memory.CONFIGS_DIR, "models", shape + ".json")
    if not os.path.exists(path):
        raise ValueError(f"--model={name}: no {path}")
    cfg = ji.ModelConfig.from_json_file(path)
    params = ji.init_params(cfg, jax.random.key(0), dtype=ji.checkpoints.weights.resolve_dtype(dtype))
    return ji.Model(cfg, params, ji.ByteTokenizer(), name=name)
