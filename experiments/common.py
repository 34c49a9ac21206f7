"""What every experiment shares: the flags they have in common (each defined once, so experiments
can be imported side by side, as the tests run them in one process), the engine's flags and the
EngineConfig they build, one rule for bad input, the run record, and timing.

The rule, for every experiment (its `main` runs under `run(main)`): bad input ends the run with one
`error: ...` line that names the flag, and exit status 2, before any model loads or compiles.
`run` parses the flags (an unknown or malformed one, or one that belongs to another experiment and
would be ignored here, is refused) and checks the paths they name (OUTPUT_FILES, OUTPUT_FOLDERS,
INPUT_FILES, INPUT_FOLDERS) and --spec_draft; main checks the rest of its flags first thing
(require, check_draft, gpu_or_allow_cpu and its own ranges), then works. A ValueError raised later (the
library's, ConfigError and CheckpointError included) is reported the same way. Optional extras are
imported only where used; a missing one is named with the `pip install 'jaxinfer[EXTRA]'` line
that installs it (require, and any ModuleNotFoundError of a module in EXTRAS).

The experiments run the same from a checkout (`python -m experiments.X`, from the repository root)
and from an installed wheel (`python -m jaxinfer.experiments.X` or the console scripts, from any
directory); paths in flags are taken relative to the working directory.

Scale-out: `--tp=N` runs the model tensor-parallel over the first N devices (EngineConfig(tp=N)),
`--ep=M` a mixture of experts' experts split over M groups of them as well (EngineConfig(ep=M)).
On several hosts, start the same command on each with `--coordinator=HOST:PORT --num_processes=P
--process_id=I` (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): `run` calls
jax.distributed.initialize before main, so jax.devices() lists every host's devices.
"""

from __future__ import annotations

import dataclasses
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
from jaxinfer.speculative.config import SHIPPED_DRAFTERS

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "tiny", "A shipped model (tiny, tiny-draft) or a local HF checkpoint directory; "
                    "bench_batching also takes random:NAME, random weights shaped like configs/models/NAME.json.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Weights and activations dtype.")
flags.DEFINE_bool("dequantize", False, "Dequantise a packed checkpoint's projections (GGUF blocks, AWQ/GPTQ) to "
                  "--dtype on load: on a CPU, XLA otherwise dequantises every matrix on every step.")
flags.DEFINE_integer("seed", 0, "Seed of the run's random draws (workload, sampling, calibration).")
flags.DEFINE_string("dir", "", "The folder a report reads (sweep_report: a sweep's results.jsonl; gpu_report: a GPU "
                    "session's JSON files).")
flags.DEFINE_string("out", "", "Write the JSON result to this file ('' = do not write; sweep: the folder of its "
                    "points and results.jsonl).")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "pallas"], "Attention implementation (auto: pallas on a GPU, "
                  "xla elsewhere; pallas runs interpreted on a CPU).")
flags.DEFINE_enum("matmul", "auto", ["auto", "xla", "pallas"], "How quantised weights are multiplied (pallas: dequantise "
                  "in the kernel, interpreted on a CPU).")
flags.DEFINE_integer("windows", 64, "Held-out evaluation windows.")
flags.DEFINE_integer("seq_len", 512, "Tokens per window.")
flags.DEFINE_bool("quick", False, "Tiny shapes and 2 runs of 2 calls: a smoke test that runs on a CPU.")
flags.DEFINE_bool("allow_cpu", False, "GPU benchmarks (bench_kernels, bench_quant_matmul): run on a CPU anyway, "
                  "interpreted, at small default shapes (without it, or --quick, they refuse a CPU).")
flags.DEFINE_bool("interpret", None, "Pallas interpret mode (default: on when there is no GPU).")
flags.DEFINE_integer("prompt_len", None, "Prompt tokens (default: the script's; bench_batching: the fixed value or "
                     "the mean of its distribution).")
flags.DEFINE_integer("max_tokens", None, "Tokens to generate per prompt (default: the script's).")
flags.DEFINE_string("plot", "", "Write the script's plot to this PNG ('' = no plot).")
flags.DEFINE_integer("calib_sequences", 256, "Calibration sequences (AWQ, GPTQ, SmoothQuant, static FP8).")
flags.DEFINE_integer("calib_len", 256, "Tokens per calibration sequence.")
flags.DEFINE_string("table", "", "Write the script's markdown table here ('' = print it only).")
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

flags.DEFINE_enum("layer_loop", "auto", ["auto", "scan", "unroll"], "How a step runs the layers: a scan over the "
                  "stacked weights, or unrolled over one array per layer (the CPU's fast layout, bfloat16 and W8A8 "
                  "above all; compile time grows with depth; tp = 1); auto: unrolled on the CPU for bfloat16 / "
                  "float16 or W8A8 models, the scan elsewhere.")
flags.DEFINE_integer("tp", 1, "Tensor-parallel degree: the model and its KV cache split over the first tp devices "
                     "(every host's, with --coordinator; a CPU fakes devices with XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N). kv_capacity: plan per card at this tp.")
flags.DEFINE_integer("ep", 1, "Expert-parallel degree (a mixture-of-experts model): the experts split on E over ep "
                     "groups of tp devices, tp x ep devices in all. kv_capacity: plan per card at this ep.")
flags.DEFINE_string("coordinator", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                    "Multi-host: the coordinator's HOST:PORT (process 0's host); '' = one process.")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                     "Multi-host: processes in the run, one per host.")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", 0)), "Multi-host: this process's index.")

flags.DEFINE_string("kv_dtype", "", "KV-cache dtype: '' (the model's own), int8 or fp8 (quantised per token and "
                    "head, float32 scales); kv_capacity also takes float32, bfloat16, float16 (its default bfloat16).")

flags.DEFINE_enum("spec", "none", ["none", *DRAFTERS], "Speculative decoding method (none: plain decoding).")
flags.DEFINE_integer("spec_tokens", 5, "Tokens drafted per target pass (k).")
flags.DEFINE_string("spec_draft", "", f"The drafter: a shipped name ({', '.join(SHIPPED_DRAFTERS)}) or a directory "
                    "('': the method's shipped one).")
flags.DEFINE_float("spec_accept", 0.8, "Acceptance probability of --spec=synthetic (a stand-in drafter), and of a "
                   "random EAGLE-3 head (draft 'random': its drafting timed at this acceptance); not lossless.")
flags.DEFINE_integer("spec_tree_top_k", 0, "EAGLE: draft a dynamic tree (EAGLE-2) expanding this many candidates per "
                     "step into this many children each, --spec_tokens of them verified (0: a chain).")
flags.DEFINE_integer("spec_tree_depth", 5, "EAGLE tree: its depth (expansion steps + 1).")
flags.DEFINE_float("spec_tree_temperature", 1.0, "EAGLE tree: temperature of the draft log-probabilities that rank "
                   "candidates (1: EAGLE-2's).")

ENGINE_FLAGS = ("batching", "kv_layout", "page_size", "kv_budget_tokens", "max_batch", "max_tokens_per_step",
                "chunked_prefill", "prefix_cache", "attention", "matmul", "decode_steps", "overlap", "kv_dtype",
                "max_adapters", "max_lora_rank", "lora_impl", "tp", "ep", "layer_loop")
DISTRIBUTED_FLAGS = ("coordinator", "num_processes", "process_id")
SPEC_FLAGS = ("spec", "spec_tokens", "spec_draft", "spec_accept", "spec_tree_top_k", "spec_tree_depth",
              "spec_tree_temperature")
DEFAULT_DRAFTS = {method: name for name, method in SHIPPED_DRAFTERS.items()}  # each method's shipped drafter


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


def check_draft(method: str, draft: str, flag: str) -> None:
    """Refuse, before any model loads, a drafter for `method` that is neither a shipped one for it
    nor a directory holding one (the file its registry entry names: drafter.json for heads,
    config.json for a draft model or an EAGLE-3 head)."""
    draft = draft or DEFAULT_DRAFTS.get(method, "")
    if method not in DRAFTERS or not DRAFTERS[method].checkpoint:
        return
    if draft in SHIPPED_DRAFTERS:
        if SHIPPED_DRAFTERS[draft] != method:
            raise ValueError(f"{flag}: {draft} is the shipped {SHIPPED_DRAFTERS[draft]} drafter, not one for method "
                             f"{method}")
        return
    if not os.path.isdir(draft):
        raise ValueError(f"{flag}: {draft} is neither a directory nor a shipped drafter ({', '.join(SHIPPED_DRAFTERS)})")
    needed = DRAFTERS[method].markers
    if not any(os.path.isfile(os.path.join(draft, name)) for name in needed):
        raise ValueError(f"{flag}: {draft} holds no {' or '.join(needed)}: not a drafter for method {method}")


def mesh():
    """The mesh --tp and --ep ask for (the first tp x ep devices), or None for tp = ep = 1."""
    return sharding.make_mesh(FLAGS.tp, ep=FLAGS.ep) if FLAGS.tp * FLAGS.ep > 1 else None


def value_or(name: str, default):
    """A flag's value, or the script's default when it was left unset (None)."""
    value = FLAGS[name].value
    return default if value is None else value


def engine_values() -> dict:
    """The engine flags as EngineConfig fields (0 / '' flag values mean the library's None)."""
    values = {name: FLAGS[name].value for name in ENGINE_FLAGS}
    values["kv_budget_tokens"] = values["kv_budget_tokens"] or None
    values["kv_dtype"] = values["kv_dtype"] or None
    return values


def engine_config(**overrides) -> ji.EngineConfig:
    """The EngineConfig the engine and speculative flags describe (overrides win)."""
    values = engine_values()
    values["speculative"] = spec_config(FLAGS.spec, FLAGS.spec_tokens, FLAGS.spec_draft, FLAGS.spec_accept,
                                        tree_config())
    return ji.EngineConfig(**{**values, **overrides})


# Optional extras: the module, and the extra of pyproject.toml that installs it.
EXTRAS = {"matplotlib": "plots", "ray": "ray", "fastapi": "serve", "uvicorn": "serve", "aiohttp": "serve",
          "torch": "peers", "transformers": "peers", "lm_eval": "eval"}
# Flags naming paths, checked by `run` before main when the experiment takes them and they are set.
OUTPUT_FILES = ("out", "plot", "report", "markdown", "table", "save_corpus")  # its folder must be writable
OUTPUT_FOLDERS = ("out_dir", "ckpt_dir", "runs_dir")  # a folder the run creates (or resumes)
INPUT_FILES = ("prompts_file", "workload_file", "chat_template", "corpus")  # must be a readable file
INPUT_FOLDERS = ("dir", "evaluate", "adapter_dir")  # must be a folder


def fail(message) -> None:
    """End the run: one `error: ...` line on stderr, exit status 2."""
    print("error: " + "; ".join(line.strip() for line in str(message).splitlines() if line.strip()), file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag reported as one error line (absl: a usage block, status 1)."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)")
    if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]}: every input is a --flag=value (--help lists the flags)")
    return rest


def check_taken(module) -> set[str]:
    """The flags `module` (an experiment's main module) takes; a flag of another experiment given on
    the command line is refused, since this one would ignore it."""
    taken = {f.name for f in FLAGS.get_key_flags_for_module(module)} | set(DISTRIBUTED_FLAGS)
    name = getattr(module.__spec__, "name", module.__name__).rsplit(".", 1)[-1]
    for owner, defined in FLAGS.flags_by_module_dict().items():
        if owner.startswith(f"{__package__}."):
            for flag in defined:
                if flag.present and flag.name not in taken:
                    raise ValueError(f"--{flag.name} is not a flag of {name}, which would ignore it (--help lists "
                                     "its flags)")
    return taken


def check_paths(taken: set[str], folders: tuple[str, ...] = ()) -> None:
    """Check each path flag of OUTPUT_FILES, OUTPUT_FOLDERS, INPUT_FILES and INPUT_FOLDERS that the
    experiment takes and that is set; `folders`: flags of OUTPUT_FILES that name a folder here."""
    checks = {**dict.fromkeys(OUTPUT_FILES, check_out), **dict.fromkeys(OUTPUT_FOLDERS + folders, check_folder),
              **dict.fromkeys(INPUT_FILES, check_in), **dict.fromkeys(INPUT_FOLDERS, check_dir)}
    for name, check in checks.items():
        if name in taken and FLAGS[name].value:
            check(FLAGS[name].value, name)


def run(main, *, folders: tuple[str, ...] = (), distributed: bool = True) -> None:
    """app.run(main) under the experiments' rule (this module's docstring). `folders`: flags of
    OUTPUT_FILES that name a folder the run creates, not a file. distributed=False: main starts
    jax.distributed itself, if at all (--coordinator is its to read)."""

    def guarded(argv):
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no TPU-probe line on a CPU
        try:
            taken = check_taken(sys.modules[main.__module__])
            check_paths(taken, folders)
            if "spec" in taken:
                check_draft(FLAGS.spec, FLAGS.spec_draft, f"--spec_draft={FLAGS.spec_draft}")
            if FLAGS.coordinator and distributed:
                sharding.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
            main(argv)
        except ValueError as e:
            fail(e)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            fail(f"{top} is not installed: pip install 'jaxinfer[{EXTRAS[top]}]'")

    app.run(guarded, flags_parser=parse_flags)


def check_out(path: str, flag: str) -> None:
    """Refuse, before any work, an output file whose folder is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--{flag}={path} is a directory, not a file")
    if not os.path.isdir(folder):
        raise ValueError(f"--{flag}={path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--{flag}={path}: the directory {folder} is not writable")


def check_folder(path: str, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--{flag}={path} is a file, not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--{flag}={path}: cannot create it under {parent}")


def check_dir(path: str, flag: str) -> None:
    """Refuse, before any work, an input folder that does not exist."""
    if not os.path.isdir(path):
        raise ValueError(f"--{flag}={path}: no such directory")


def check_in(path: str, flag: str) -> None:
    """Refuse, before any work, an input file that does not exist or cannot be read."""
    if not os.path.isfile(path):
        raise ValueError(f"--{flag}={path}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"--{flag}={path}: the file is not readable")


def require(what: str, *modules: str) -> None:
    """Refuse, before any work, `what` (a flag, or the script) when a module it needs is not
    installed, naming the extra that installs it."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{what} needs {module}: pip install 'jaxinfer[{EXTRAS[module]}]'")


def gpu_or_allow_cpu(script: str, shapes: str) -> bool:
    """For a benchmark of GPU kernels: whether it runs on a CPU (at small shapes, interpreted).
    Refuses a CPU unless --allow_cpu (or --quick) asks for one: its GPU shapes would run
    interpreted for minutes to hours."""
    if jax.default_backend() == "gpu":
        return False
    if not (FLAGS.allow_cpu or FLAGS.quick):
        raise ValueError(f"--allow_cpu: {script} times GPU kernels ({shapes}); on this {jax.default_backend()} "
                         "they would run interpreted for minutes: run it on a GPU, or pass --allow_cpu (small shapes) "
                         "or --quick")
    return True


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
    if module == "__main__":  # run as `python -m jaxinfer.experiments.X`: the name it was run by
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
        model = ji.load_model(name, dtype=dtype)
        if FLAGS.dequantize:  # (an experiment that does not declare --dequantize refuses it)
            from jaxinfer.quant import dequantize_params  # noqa: PLC0415
            model = dataclasses.replace(model, params=dequantize_params(model.params))
        return model
    shape = name.split(":", 1)[1]
    path = shape if shape.endswith(".json") else os.path.join(memory.CONFIGS_DIR, "models", shape + ".json")
    if not os.path.exists(path):
        raise ValueError(f"--model={name}: no {path}")
    cfg = ji.ModelConfig.from_json_file(path)
    params = ji.init_params(cfg, jax.random.key(0), dtype=ji.checkpoints.weights.resolve_dtype(dtype))
    return ji.Model(cfg, params, ji.ByteTokenizer(), name=name)
