"""Serve a model over HTTP with OpenAI's API (jaxinfer/serving/server.py): completions, chat completions,
models, health.

  python -m jaxinfer.experiments.serve --model=tiny --port=8000
  python -m jaxinfer.experiments.serve --model=smollm2-135m --dequantize --max_batch=16 --kv_dtype=int8
  python -m jaxinfer.experiments.serve --model=tiny --max_adapters=4 --lora=math=/ckpt/lora-math,code=/ckpt/lora-code

then `openai.OpenAI(base_url="http://localhost:8000/v1", api_key="-")`, or
`curl localhost:8000/v1/completions -d '{"model": "tiny", "prompt": "def f(x):", "max_tokens": 16}'`.

With an API key (--api_key, or the environment variable JAXINFER_API_KEY, which other users of the
machine cannot read off the process list), every /v1 route (every path but /health and the API's
description) needs `Authorization: Bearer KEY`. On an
address other machines can reach (--host=0.0.0.0) the server refuses to start without a key unless
--allow_unauthenticated. Each request is bounded before any work (--max_body_bytes, --max_n,
--max_stop, --max_messages, the prompt's characters, --max_concurrent_requests, --default_timeout_s).

Replicas on several hosts: start one engine core per host as the processes of one jax.distributed
job, `--core_only=tcp://*:PORT --coordinator=HOST0:PORT0 --num_processes=N --process_id=I` (each
core a replica on its own host's devices, --tp within the host), then an API server with
`--engine_cores=tcp://ANY_CORE_HOST:PORT`: a core of the job names every other (their addresses
go through jax.distributed's key-value store), and requests go to the core most likely to hold
their prefix. A core that dies leaves the others serving (the job is recoverable), except process 0:
it runs the job's coordination service, and JAX ends the others when it goes.

Every EngineConfig option is a flag (the engine flags of experiments/common.py, and here the few
no other experiment takes). LoRA adapters (--lora=NAME=DIR,...) are loaded before serving; a
request selects one with `model: NAME`. Needs `pip install 'jaxinfer[serve]'`.
"""

from __future__ import annotations

import os
import socket
import time

from absl import flags

import jaxinfer as ji
from jaxinfer.serving import core, core_client
from jaxinfer.serving.limits import ServerLimits

from . import (
    common,
    generate,  # noqa: F401  (defines --dequantize)
)

FLAGS = flags.FLAGS
API_KEY_ENV = "JAXINFER_API_KEY"
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: a free one).")
flags.DEFINE_list("lora", [], "LoRA adapters to load, NAME=DIR (a PEFT directory) each; a request's `model` names one. "
                  "Needs --max_adapters >= 1.")
flags.DEFINE_string("chat_template", "", "A jinja chat template file, replacing the model's own ('' = the model's).")
flags.DEFINE_string("served_model_name", "", "The base model's name in the API ('' = the model's own name).")
flags.DEFINE_bool("precompile", False, "Compile every program the engine can run before serving (Engine.warmup); "
                  "otherwise the first request of each new shape compiles it.")
flags.DEFINE_integer("max_seq_len", None, "EngineConfig.max_seq_len: the longest sequence served (default: the model's "
                     "context).")
flags.DEFINE_integer("num_pages", None, "EngineConfig.num_pages: the KV budget in pages (default: --kv_budget_tokens).")
flags.DEFINE_integer("kv_budget_bytes", None, "EngineConfig.kv_budget_bytes: the KV budget in bytes, when neither "
                     "pages nor tokens are given.")
_LIMITS = ServerLimits()
flags.DEFINE_float("default_timeout_s", _LIMITS.request_timeout_s, "Each request's deadline in seconds from arrival; "
                   "then it ends with finish_reason \"timeout\" (0: none).")
flags.DEFINE_string("api_key", "", "The key every /v1 request must send as 'Authorization: Bearer KEY' ('' = the "
                    f"environment variable {API_KEY_ENV}; neither: no key).")
flags.DEFINE_bool("allow_unauthenticated", False, "Serve an address other machines can reach (--host) without an API "
                  "key.")
flags.DEFINE_integer("max_body_bytes", _LIMITS.max_body_bytes, "Largest request body in bytes; a bigger one gets 413, "
                     "refused as it arrives.")
flags.DEFINE_integer("max_prompt_chars", None, "Most characters in a prompt (a chat's contents together), refused "
                     "before tokenising (default: max_seq_len times the longest token).")
flags.DEFINE_integer("max_n", _LIMITS.max_n, "Most samples (n) in one request.")
flags.DEFINE_integer("max_stop", _LIMITS.max_stop, "Most stop strings in one request.")
flags.DEFINE_integer("max_stop_chars", _LIMITS.max_stop_chars, "Most characters in one stop string.")
flags.DEFINE_integer("max_messages", _LIMITS.max_messages, "Most messages in one chat request (and text parts in one "
                     "message).")
flags.DEFINE_enum("engine", "process", ["process", "thread"], "Where the engine runs: 'process', an engine core "
                  "process of its own (jaxinfer/serving/core.py; this process does the HTTP work, tokenising and "
                  "detokenising); 'thread', a thread of this process.")
flags.DEFINE_integer("data_parallel", 1, "Engine cores (replicas, --engine=process), one per device or per --tp "
                     "group, behind this one API; a request goes to the core most likely to hold its prompt's prefix.")
flags.DEFINE_list("engine_cores", [], "Serve engine cores already running at these addresses (tcp://HOST:PORT or "
                  "ipc://PATH, each started with --core_only) instead of starting any: the model comes from them.")
flags.DEFINE_string("core_only", "", "Run only an engine core, bound to this address (tcp://*:PORT, ipc://PATH), "
                    "for API servers started with --engine_cores; no HTTP. Its messages are pickles: only the API "
                    "servers may reach the address (a trusted network).")
flags.DEFINE_string("core_host", "", "--core_only with --coordinator: the host name or address other hosts reach "
                    "this core at, when --core_only binds every interface ('' = this host's name).")
flags.DEFINE_float("client_timeout_s", 10.0, "An engine core aborts the requests of an API server it has not heard "
                   "from in this many seconds (API servers ping twice a second).")
flags.DEFINE_integer("max_concurrent_requests", _LIMITS.max_concurrent_requests, "Most generation requests held at "
                     "once, running or waiting; past it: 429 with Retry-After.")
SERVE_FLAGS = ("max_seq_len", "num_pages", "kv_budget_bytes")
for _name in ("model", "dtype", "dequantize", *common.ENGINE_FLAGS, *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)


def load_model() -> ji.Model:
    """--model at --dtype; with --dequantize a packed checkpoint's projections unpacked once."""
    return common.load_bench_model(FLAGS.model, FLAGS.dtype)


def engine_config() -> ji.EngineConfig:
    """The EngineConfig of the engine flags and this script's own (SERVE_FLAGS)."""
    return common.engine_config(**{name: FLAGS[name].value for name in SERVE_FLAGS})


def core_spec(warmup: tuple | None = None) -> core.CoreSpec:
    """What each engine core builds: --model (a name the core loads itself; random weights,
    random:SHAPE, are drawn here and sent whole), the engine flags, --lora."""
    model = load_model() if FLAGS.model.startswith("random:") else FLAGS.model
    return core.CoreSpec(model, engine_config(), dtype=FLAGS.dtype,
                         dequantize=FLAGS.dequantize and isinstance(model, str), adapters=adapters(), warmup=warmup)


def replica_env(i: int) -> dict[str, str]:
    """The devices of replica i: its --tp x --ep GPUs (CUDA_VISIBLE_DEVICES, which the CPU backend
    ignores). This process never starts a JAX backend of its own, so it holds no GPU memory."""
    if FLAGS.data_parallel == 1:
        return {}
    n = FLAGS.tp * FLAGS.ep
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in range(i * n, (i + 1) * n))}


def start_cores(spec: core.CoreSpec, cpus: tuple[int, ...] = ()) -> tuple[object, list]:
    """--data_parallel engine cores for `spec`, each in its own process (cpus: the CPUs they run on);
    the client the server uses (a CoreClient, or Replicas) and the processes."""
    if FLAGS.data_parallel < 1:
        raise ValueError(f"--data_parallel must be >= 1, got {FLAGS.data_parallel}")
    procs = [core.spawn_core(spec, env=replica_env(i), client_timeout_s=FLAGS.client_timeout_s, cpus=cpus)
             for i in range(FLAGS.data_parallel)]
    try:
        return core_client.connect([p.address for p in procs], procs), procs
    except BaseException:
        for p in procs:
            p.stop()
        raise


def adapters() -> dict[str, str]:
    """--lora as {name: directory}, checked before any model loads."""
    named = {}
    for item in FLAGS.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora={item}: expected NAME=DIR")
        if not os.path.isdir(path):
            raise ValueError(f"--lora={item}: {path} is not a directory")
        named[name] = path
    if named and FLAGS.max_adapters < 1:
        raise ValueError(f"--lora needs --max_adapters >= 1 (device slots for the adapters), not {FLAGS.max_adapters}")
    return named


def build_engine(model: ji.Model) -> ji.Engine:
    """The engine every flag describes, with the --lora adapters added."""
    engine = ji.Engine(model, engine_config())
    for name, path in adapters().items():
        engine.add_adapter(name, path)
    return engine


def server_limits() -> ServerLimits:
    """The limits the flags set (ValueError naming the flag if one is out of range)."""
    values = {name: FLAGS[name].value for name in ("max_body_bytes", "max_prompt_chars", "max_n", "max_stop",
                                                     "max_stop_chars", "max_messages", "max_concurrent_requests")}
    if FLAGS.default_timeout_s is None or FLAGS.default_timeout_s < 0:
        raise ValueError(f"--default_timeout_s must be seconds >= 0 (0: none), got {FLAGS.default_timeout_s}")
    try:
        return ServerLimits(**values, request_timeout_s=FLAGS.default_timeout_s or None)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def api_key() -> str | None:
    """--api_key, else the environment's JAXINFER_API_KEY, else None (no key)."""
    return FLAGS.api_key or os.environ.get(API_KEY_ENV) or None


def chat_template() -> str | None:
    if not FLAGS.chat_template:
        return None
    with open(FLAGS.chat_template) as f:
        return f.read()


def main(argv):
    del argv
    if FLAGS.coordinator and not FLAGS.core_only:
        raise ValueError("--coordinator: the processes of a jax.distributed job are engine cores (--core_only); "
                         "an API server reaches them with --engine_cores")
    if FLAGS.core_only:
        if FLAGS.coordinator:  # one replica of a job on several hosts
            core.join_group(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        engine = core_spec(warmup=() if FLAGS.precompile else None).build()
        served = core.Core(engine, FLAGS.core_only, client_timeout_s=FLAGS.client_timeout_s)
        if FLAGS.coordinator:
            served.peers = core.publish_address(served.address, FLAGS.core_host or socket.gethostname())
        print(f"engine core for {engine.model.name} serving {served.address}"
              f"{f' (group of {len(served.peers)}: {served.peers})' if served.peers else ''}", flush=True)
        served.run()
        return
    common.require("experiments.serve", "fastapi", "uvicorn")
    adapters()
    import uvicorn  # noqa: PLC0415

    from jaxinfer.serving import guards, server  # noqa: PLC0415  (fastapi and uvicorn are an optional extra)

    key = api_key()
    guards.check_bind(FLAGS.host, key, FLAGS.allow_unauthenticated)
    limits, template = server_limits(), chat_template()
    t0 = time.perf_counter()
    procs = []
    if FLAGS.engine_cores:
        engine = core_client.connect(FLAGS.engine_cores)
    elif FLAGS.engine == "process":
        engine, procs = start_cores(core_spec(warmup=() if FLAGS.precompile else None))
    else:
        engine = build_engine(load_model())
        if FLAGS.precompile:
            engine.warmup()
    print(f"{engine.model.name} ready in {time.perf_counter() - t0:.1f} s (--engine={FLAGS.engine}"
          f"{f', {len(procs)} engine cores' if procs else ''}); max_seq_len {engine.max_seq_len}", flush=True)
    app = server.build_app(engine, FLAGS.served_model_name or None, template, limits=limits, api_key=key)
    try:
        uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, log_level="info")
    finally:
        for p in procs:
            p.stop()


def cli() -> None:
    """The `jaxinfer-serve` console script (the same as python -m jaxinfer.experiments.serve)."""
    common.run(main, distributed=False)


if __name__ == "__main__":
    cli()
