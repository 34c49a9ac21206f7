"""Tensor-parallel checks on fake CPU devices, run by tests/test_tensor_parallel.py in processes of
their own: XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax starts, and
the rest of the suite runs on one device.

  python tests/tp_checks.py [CHECK ...]               every check (or those named); one JSON object
                                                      on the last line: each check's figures, or
                                                      its error
  python tests/tp_checks.py --distributed PORT ID N   process ID of N in a jax.distributed run on
                                                      localhost: tensor parallel over one device per
                                                      process; prints the greedy tokens as JSON

The figures are compared with their tolerances in test_tensor_parallel.py. Every engine here has
the same small shape (max_batch 2, 64 tokens, prompts of at most 16 tokens), so they share
compiled programs where their configs match.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import traceback

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # float32 compared at 1e-5

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinfer as ji  # noqa: E402
from jaxinfer import quant, sharding
from jaxinfer.engine import runner as runner_lib  # noqa: E402
from jaxinfer.lora.adapter import random_adapter  # noqa: E402
from jaxinfer.models import family as family_lib
from jaxinfer.models import formats, matmul  # noqa: E402

PROMPTS = [[256, *b"def add(a, b):"], [256, *b"import os"]]
GREEDY = ji.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SHAPE = dict(max_batch=1, max_seq_len=64)
CHECKS = {}
COMPILES: collections.Counter = collections.Counter()  # XLA compilations by function name


def _count_compile(event: str, duration: float, fun_name: str = "", **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[fun_name] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _tiny():
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = ji.load_model("tiny")
    return _CACHE["tiny"]


_CACHE: dict = {}


def _row_error(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    a, e = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
    return float(np.max(np.linalg.norm(a - e, axis=-1) / np.linalg.norm(e, axis=-1)))


def _tokens(engine, adapters=None) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY, adapters=adapters)]


def _gqa_model() -> ji.Model:
    """A random Llama-shaped model with GQA (8 heads, 4 KV heads), q/k/v biases, an untied LM head and
    a vocabulary that 4 and 8 do not divide."""
    cfg = ji.ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                         num_kv_heads=4, head_dim=16, qkv_bias=True, max_position_embeddings=64)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(3), std=0.1))


def _small_model(bits: int | None = None) -> ji.Model:
    """A one-layer random model with the byte vocabulary (PROMPTS fit), small enough that the fast
    tier's checks of the slow paths compile in seconds; bits: its projections RTN-quantised (groups of 32)."""
    key = ("small", bits)
    if key not in _CACHE:
        cfg = ji.ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=16, max_position_embeddings=64)
        model = ji.Model(cfg, ji.init_params(cfg, jax.random.key(5), std=0.3))
        if bits is not None:
            model = quant.quantize_model(model, quant.QuantScheme(bits=bits, group_size=32), progress=False)
        _CACHE[key] = model
    return _CACHE[key]


@check
def forward_logits() -> dict:
    """One full causal pass: per-row relative error against tp = 1 of the tiny model at tp = 2 and 4
    (its 2 KV heads stored twice at 4, its tied vocabulary of 258 padded) and the GQA model at tp = 8
    (its 4 KV heads stored twice, biases split, an untied head padded from 250 to 256)."""
    tokens = np.asarray([PROMPTS[0], PROMPTS[0][::-1]], np.int32) % 250
    out = {}
    for name, model, tps in (("tiny", _tiny(), (2, 4)), ("gqa", _gqa_model(), (8,))):
        reference = ji.forward_logits(model, tokens)
        for tp in tps:
            placed = sharding.shard_model(model, sharding.make_mesh(tp))
            out[f"{name}_tp{tp}"] = _row_error(ji.forward_logits(placed, tokens), reference)
    return {"max_row_error": out}


@check
def engine_greedy() -> dict:
    """Greedy tokens through the paged engine at tp = 1, 2, 4; tp = 2 warmed up first, then counted:
    its run must trace and compile nothing. Per-device bytes of params and KV cache, measured from
    the arrays' shards."""
    tokens, memory = {}, {}
    for tp in (1, 2, 4):
        engine = ji.Engine(_tiny(), ji.EngineConfig(tp=tp, **SHAPE))
        if tp == 2:
            engine.warmup(max_prompt_len=16, max_len=24)
            traces, compiles = dict(runner_lib.TRACE_COUNTS), dict(COMPILES)
        tokens[tp] = _tokens(engine)
        if tp == 2:
            new_traces = {k: v - traces.get(k, 0) for k, v in runner_lib.TRACE_COUNTS.items() if v != traces.get(k, 0)}
            new_compiles = {k: v - compiles.get(k, 0) for k, v in COMPILES.items() if v != compiles.get(k, 0)}
        runner = engine.runner
        memory[tp] = {
            "params": max(sharding.nbytes_per_device(runner.model.params).values()),
            "layers": max(sharding.nbytes_per_device(runner.model.params["layers"]).values()),
            "cache": max(sharding.nbytes_per_device(runner.cache).values()),
            "cache_spec": str(runner.cache.k.sharding.spec) if tp > 1 else "",
            "devices": len(sharding.nbytes_per_device(runner.cache)),
        }
    return {"tokens": tokens, "new_traces": new_traces, "new_compiles": new_compiles, "bytes_per_device": memory}


@check
def int4_lora_kv_int8() -> dict:
    """An int4 model (RTN, groups of 32) with a LoRA adapter on every projection and an int8 KV
    cache: tp = 2 against tp = 1, one prompt under the adapter and one on the base."""
    model = quant.quantize_model(_tiny(), quant.QuantScheme(bits=4, group_size=32, pad=True), progress=False)
    _CACHE["int4"] = model
    adapter = random_adapter(model.config, 8, std=0.2, seed=1, name="a")
    tokens, specs = {}, {}
    for tp in (1, 2):
        engine = ji.Engine(model, ji.EngineConfig(tp=tp, kv_dtype="int8", max_adapters=1, max_lora_rank=8, **SHAPE))
        engine.add_adapter("a", adapter)
        tokens[tp] = _tokens(engine, adapters=["a", None])
        if tp == 2:
            runner = engine.runner
            layers = runner.model.params["layers"]
            specs = {"wq.qweight": str(layers["wq"].qweight.sharding.spec),
                     "w_down.qweight": str(layers["w_down"].qweight.sharding.spec),
                     "w_down.scales": str(layers["w_down"].scales.sharding.spec),
                     "k_scale": str(runner.cache.k_scale.sharding.spec),
                     "lora.a.wq": str(runner.lora.a["wq"].sharding.spec),
                     "lora.b.wq": str(runner.lora.b["wq"].sharding.spec),
                     "lora.a.wo": str(runner.lora.a["wo"].sharding.spec),
                     "lora.b.wo": str(runner.lora.b["wo"].sharding.spec)}
    _CACHE["int4_tokens_tp1"] = tokens[1]
    return {"tokens": tokens, "specs": specs}


@check
def lora_replicated_kv_heads() -> dict:
    """tp = 4 on the tiny model's 2 KV heads (each stored twice), with a LoRA adapter on wk and wv
    (their B widened like the weights): against tp = 1."""
    adapter = random_adapter(_tiny().config, 8, ("wq", "wk", "wv"), std=0.2, seed=2, name="kv")
    tokens = {}
    for tp in (1, 4):
        engine = ji.Engine(_tiny(), ji.EngineConfig(tp=tp, max_adapters=1, max_lora_rank=8, **SHAPE))
        engine.add_adapter("kv", adapter)
        tokens[tp] = _tokens(engine, adapters=["kv", "kv"])
    return {"tokens": tokens}


@check
def logprobs() -> dict:
    """Prompt and generated-token log-probabilities (top-3) at tp = 2 against tp = 1, over chunked
    prompts: the largest difference of any log-probability, and whether the top ids agree."""
    sp = ji.SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=3, logprobs=3)
    runs = {}
    for tp in (1, 2):
        engine = ji.Engine(_tiny(), ji.EngineConfig(tp=tp, max_tokens_per_step=8, **SHAPE))
        runs[tp] = engine.generate(PROMPTS, sp)
    error, same_top = 0.0, True
    for a, b in zip(runs[1], runs[2]):
        pairs = [(x, y) for x, y in zip(a.prompt_logprobs, b.prompt_logprobs) if x is not None]
        pairs += list(zip(a.logprobs, b.logprobs))
        for x, y in pairs:
            error = max(error, abs(x.logprob - y.logprob), *(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top)))
            same_top &= [t for t, _ in x.top] == [t for t, _ in y.top]
    return {"max_abs_error": error, "same_top": same_top, "tokens_equal": [o.token_ids for o in runs[1]] ==
            [o.token_ids for o in runs[2]], "entries": sum(len(o.prompt_logprobs) + len(o.logprobs) for o in runs[1])}


def _tokens_counting_shard_maps(engine) -> tuple[list[list[int]], collections.Counter]:
    """The engine's greedy tokens, and the functions it wrapped per shard (jax.shard_map), by name."""
    shard_maps: collections.Counter = collections.Counter()
    real = jax.shard_map

    def counting(f, **kwargs):
        shard_maps[getattr(f, "__name__", None) or getattr(f, "func").__name__] += 1
        return real(f, **kwargs)

    jax.shard_map = counting
    try:
        return _tokens(engine), shard_maps
    finally:
        jax.shard_map = real


@check
def pallas_per_shard() -> dict:
    """attention="pallas" and matmul="pallas" at tp = 2 (the kernels per shard under shard_map, in
    interpret mode): the int4 model with an int8 KV cache against the XLA path at tp = 1. Then the
    quantised matmul alone with GPTQ's act-order permutation, column- and row-parallel."""
    if "int4_tokens_tp1" not in _CACHE:
        int4_lora_kv_int8()
    engine = ji.Engine(_CACHE["int4"], ji.EngineConfig(tp=2, kv_dtype="int8", attention="pallas", matmul="pallas",
                                                        **SHAPE))
    pallas_tokens, shard_maps = _tokens_counting_shard_maps(engine)
    tokens = {"pallas_tp2": pallas_tokens[1], "xla_tp1": _CACHE["int4_tokens_tp1"][1]}

    rng = np.random.default_rng(0)
    K, N, g = 96, 64, 16
    w = formats.QuantizedWeight(qweight=jnp.asarray(rng.integers(0, 256, (1, K // 2, N)), jnp.uint8),
                                scales=jnp.asarray(rng.uniform(0.01, 0.02, (1, K // g, N)), jnp.float32), zeros=None,
                                perm=jnp.asarray(rng.permutation(K)[None], jnp.int32), bits=4, group_size=g,
                                in_features=K)
    x = jnp.asarray(rng.normal(size=(3, 5, K)), jnp.float32)
    reference = jnp.einsum("btk,kn->btn", x, formats.dequantize(w)[0])
    mesh = sharding.make_mesh(2)
    errors = {}
    for name, parallel in (("wq", "column"), ("wo", "row")):
        placed = sharding.put(w, sharding.param_specs({"embed": None, "layers": {name: w}}, 2)["layers"][name], mesh)
        x_spec = sharding.P(None, None, "tp") if parallel == "row" else sharding.P()
        xs = sharding.put(x, x_spec, mesh)

        def run(x, w, parallel=parallel):
            return matmul.linear(x, jax.tree.map(lambda a: a[0], w), impl="pallas", parallel=parallel)

        with sharding.use_mesh(mesh):
            errors[parallel] = _row_error(jax.jit(run)(xs, placed), reference)
    return {"tokens": tokens, "act_order_row_error": errors, "shard_maps": shard_maps}


@check
def speculative() -> dict:
    """Greedy speculative decoding (lossless: the tokens of plain decoding): prompt lookup at tp = 2,
    EAGLE at tp = 4 (its heads on the target's replicated KV heads and padded vocabulary), EAGLE-3
    at tp = 2 (its fused layers read from the sharded feature cache)."""
    tokens = {}
    for method, draft, tp in (("ngram", None, 2), ("eagle", "tiny-eagle", 4), ("eagle3", "tiny-eagle3", 2)):
        spec = ji.SpeculativeConfig(method=method, num_tokens=3, draft=draft)
        engine = ji.Engine(_tiny(), ji.EngineConfig(tp=tp, speculative=spec, **SHAPE))
        tokens[f"{method}_tp{tp}"] = _tokens(engine)
        tokens[f"{method}_tp{tp}_tokens_per_pass"] = engine.metrics()["spec_tokens_per_pass"]
    return {"tokens": tokens}


@check
def structured() -> dict:
    """Structured output at tp = 2 against tp = 1: JSON-schema and regex rows at temperature 1 and 0
    beside a free row, decoded overlapped (masks filled while the sharded forward pass runs), and
    verified speculatively (prompt lookup: each position's grammar mask)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    params = [ji.SamplingParams(max_tokens=24, seed=1, structured=ji.StructuredOutput(json_schema=schema)),
              ji.SamplingParams(max_tokens=16, temperature=0.0,
                                structured=ji.StructuredOutput(regex=r"[a-c]{2,4}-[0-9]{2}")),
              ji.SamplingParams(max_tokens=12, seed=2)]
    prompts = [PROMPTS[0]] * len(params)
    tokens = {}
    for name, tp, spec in (("tp1", 1, None), ("tp2", 2, None),
                           ("ngram_tp2", 2, ji.SpeculativeConfig(method="ngram", num_tokens=3))):
        engine = ji.Engine(_tiny(), ji.EngineConfig(tp=tp, speculative=spec, max_batch=4, max_seq_len=64))
        tokens[name] = [o.token_ids for o in engine.generate(prompts, params)]
    return {"tokens": tokens}


@check
def pallas_per_shard_small() -> dict:
    """pallas_per_shard's path on the small int4 model (the fast tier's): attention="pallas" and
    matmul="pallas" with an int8 KV cache at tp = 2 against the XLA path at tp = 1, and the kernels
    that went through shard_map."""
    model = _small_model(bits=4)
    tokens = {"xla_tp1": _tokens(ji.Engine(model, ji.EngineConfig(kv_dtype="int8", **SHAPE)))}
    engine = ji.Engine(model, ji.EngineConfig(tp=2, kv_dtype="int8", attention="pallas", matmul="pallas", **SHAPE))
    tokens["pallas_tp2"], shard_maps = _tokens_counting_shard_maps(engine)
    return {"tokens": tokens, "shard_maps": shard_maps}


@check
def speculative_small() -> dict:
    """speculative's path on the small model (the fast tier's): prompt lookup at tp = 2, its verify
    passes and rollbacks sharded, against plain decoding at tp = 1."""
    model = _small_model()
    spec = ji.SpeculativeConfig(method="ngram", num_tokens=3)
    engine = ji.Engine(model, ji.EngineConfig(tp=2, speculative=spec, **SHAPE))
    tokens = {"plain_tp1": _tokens(ji.Engine(model, ji.EngineConfig(**SHAPE))), "ngram_tp2": _tokens(engine)}
    return {"tokens": tokens, "spec_passes": engine.metrics()["spec_passes"]}


def _with_mxfp4_experts(model):
    from jaxinfer.models.formats import MXFP4Weight

    rng, layers = np.random.default_rng(5), dict(model.params["layers"])
    for name in ("experts_gate", "experts_up", "experts_down"):
        *lead, K, N = layers[name].shape
        layers[name] = MXFP4Weight(blocks=rng.integers(0, 256, (*lead, N, K // 32, 16), dtype=np.uint8),
                                   scales=rng.integers(118, 122, (*lead, N, K // 32), dtype=np.uint8))
    return ji.Model(model.config, {**model.params, "layers": layers})


_COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=24)
_MOE = {"mixtral": dict(_COMMON, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          norm_topk_prob=True),
        "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48),
        "gpt_oss": dict(_COMMON, model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=16))}
_MOE["gpt_oss_mxfp4"] = _MOE["gpt_oss"]
_MOE["mixtral_int4_experts"] = _MOE["mixtral"]
FAMILIES = {"gemma2": dict(_COMMON, model_type="gemma2", attn_logit_softcapping=3.0, final_logit_softcapping=4.0),
            "gemma3": dict(_COMMON, model_type="gemma3_text", sliding_window_pattern=2),
            "phi3": dict(_COMMON, model_type="phi3"), **_MOE,
            # MLA: the latents' down-projections replicated, wq_b / wkv_b split by head, wo by its input
            "deepseek_v2": dict(_COMMON, model_type="deepseek_v2", num_key_value_heads=4, kv_lora_rank=32,
                                qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=3),
            "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24,
                                qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=8, first_k_dense_replace=3),
            # a dense first layer, then experts (the layers unrolled) split over tp on their F axis
            "deepseek_v3_moe": dict(_COMMON, model_type="deepseek_v3", num_key_value_heads=4, kv_lora_rank=32,
                                    qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
                                    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                                    topk_group=1, n_shared_experts=1)}


def _family_model(name: str) -> ji.Model:
    """The random small model of FAMILIES[name] (gpt-oss's experts in MXFP4, Mixtral's in int4, by name)."""
    if name not in _CACHE:
        cfg = ji.ModelConfig.from_hf_dict(FAMILIES[name])
        model = ji.Model(cfg, ji.init_params(cfg, jax.random.key(11), std=0.02))  # (0.02: tokens that vary)
        if name.endswith("mxfp4"):  # the experts packed as published, random codes of the dense weights' size
            model = _with_mxfp4_experts(model)
        if name.endswith("int4_experts"):  # RTN int4 on the experts too (split over tp by their groups)
            model = quant.quantize_model(model, quant.scheme_from_name("int4-g32-experts"), progress=False)
        _CACHE[name] = model
    return _CACHE[name]


_BATCH = np.asarray([PROMPTS[0], PROMPTS[0][::-1]], np.int32)


@check
def families() -> dict:
    """Random small Gemma 2 (soft-caps, local and global layers), Gemma 3 (q/k norms, local RoPE),
    Phi-3 (its split fused projections), Mixtral, Qwen3-MoE, Qwen2-MoE and gpt-oss (experts split on
    their F axis, a shared expert, attention sinks split by head; gpt-oss's experts in MXFP4, Mixtral's in int4, too)
    models: forward logits at tp = 2 against tp = 1, and greedy tokens through the paged engine,
    XLA, and Pallas per shard (attention with a window per layer, the experts' grouped matmul),
    against tp = 1."""
    errors, tokens = {}, {}
    for name in FAMILIES:
        model = _family_model(name)
        placed = sharding.shard_model(model, sharding.make_mesh(2))
        errors[name] = _row_error(ji.forward_logits(placed, _BATCH), ji.forward_logits(model, _BATCH))
        tokens[name] = {"tp1": _tokens(ji.Engine(model, ji.EngineConfig(**SHAPE))),
                        "tp2": _tokens(ji.Engine(model, ji.EngineConfig(tp=2, **SHAPE))),
                        "pallas_tp2": _tokens(ji.Engine(model, ji.EngineConfig(tp=2, attention="pallas", matmul="pallas",
                                                                               **SHAPE)))}
    return {"max_row_error": errors, "tokens": tokens}


# (tp, ep) meshes the expert-parallel checks place the models on: ep alone, with tp, all 8 devices.
EP_MESHES = ((1, 2), (1, 4), (2, 2), (2, 4))


def _expert_bytes(model) -> int:
    """The most bytes of expert weights any one device holds (an unplaced model: all of them)."""
    experts = {n: w for n, w in model.params["layers"].items() if family_lib.parallel_style(n) in family_lib.EXPERT_ROLES}
    if getattr(model, "placement", None) is None:
        return sum(np.asarray(x).nbytes for x in jax.tree.leaves(experts))
    return max(sharding.nbytes_per_device(experts).values())


def _ep_check(names, full: bool = True) -> dict:
    """Forward logits of each model at every EP_MESHES placement against the unplaced model, greedy
    tokens through the paged engine at ep = 2 (XLA), tp = 2 x ep = 2 (Pallas attention and grouped
    matmul per shard, int8 KV) and ep = 4 with prompt-lookup speculation, against ep = 1, and the
    expert bytes per device at each placement. full False: the engines at ep = 1 and 2 and the
    Pallas one without int8 KV only."""
    errors, tokens, expert_bytes = {}, {}, {}
    for name in names:
        model = _family_model(name)
        reference = ji.forward_logits(model, _BATCH)
        for tp, ep in EP_MESHES:
            placed = sharding.shard_model(model, sharding.make_mesh(tp, ep=ep))
            errors[f"{name}_tp{tp}_ep{ep}"] = _row_error(ji.forward_logits(placed, _BATCH), reference)
            expert_bytes[f"{name}_tp{tp}_ep{ep}"] = _expert_bytes(placed)
        expert_bytes[f"{name}_tp1_ep1"] = _expert_bytes(model)
        kv = "int8" if full else None
        tokens[name] = {
            "ep1": _tokens(ji.Engine(model, ji.EngineConfig(**SHAPE))),
            "ep2": _tokens(ji.Engine(model, ji.EngineConfig(ep=2, **SHAPE))),
            "pallas_tp2_ep2": _tokens(ji.Engine(model, ji.EngineConfig(tp=2, ep=2, attention="pallas", matmul="pallas",
                                                                       kv_dtype=kv, **SHAPE)))}
        if full:
            spec = ji.SpeculativeConfig(method="ngram", num_tokens=3)
            tokens[name]["int8_ep1"] = _tokens(ji.Engine(model, ji.EngineConfig(kv_dtype="int8", **SHAPE)))
            tokens[name]["ngram_ep4"] = _tokens(ji.Engine(model, ji.EngineConfig(ep=4, speculative=spec, **SHAPE)))
    return {"max_row_error": errors, "tokens": tokens, "expert_bytes": expert_bytes}


@check
def expert_parallel_small() -> dict:
    """_ep_check on Mixtral (the fast tier's: ep = 1 and 2, Pallas at tp = 2 x ep = 2)."""
    return _ep_check(["mixtral"], full=False)


@check
def expert_parallel() -> dict:
    """_ep_check on every MoE family: Mixtral, Qwen3-MoE, Qwen2-MoE (its shared expert replicated
    over ep), gpt-oss (expert biases split with their experts), its MXFP4 experts, int4 experts."""
    return _ep_check(list(_MOE))


def distributed(port: str, process_id: int, num_processes: int) -> None:
    sharding.initialize(f"localhost:{port}", num_processes, process_id)
    engine = ji.Engine(_tiny(), ji.EngineConfig(tp=num_processes, **SHAPE))
    print(json.dumps({"devices": jax.device_count(), "local_devices": jax.local_device_count(),
                      "tokens": _tokens(engine)}))


def main(names: list[str]) -> None:
    out = {}
    for name in names or list(CHECKS):
        try:
            out[name] = CHECKS[name]()
        except Exception:  # reported per check, so one failure leaves the others' figures
            out[name] = {"error": traceback.format_exc()}
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--distributed"]:
        distributed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main(sys.argv[1:])
