"""Tensor parallelism (jaxinfer/sharding.py): sharded forward logits equal unsharded, the engine's
greedy tokens equal across tp = 1, 2, 4, a warmed-up tp = 2 engine compiles nothing new, per-device
bytes fall with tp, int4 weights with a LoRA adapter and an int8 KV cache under tp = 2, two
processes through jax.distributed, the Pallas kernels per shard and speculative decoding on a
one-layer model, and (slow) the last two and KV heads replicated under a LoRA adapter on the tiny
model; expert parallelism (ep, beside tp) on every MoE family; bad tp and ep refused before anything
is compiled; the planner's --tp and --min_tp.

The sharded checks run in processes of their own (tests/tp_checks.py) with 8 fake CPU devices:
XLA_FLAGS must be set before jax starts, and the rest of the suite runs on one device. Those
processes compile with the suite's fast-compile XLA flags (conftest.py), both sides of every
comparison alike.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import flagsaver
from helpers import REPO

import jaxinfer as ji
from experiments import kv_capacity
from jaxinfer import memory, sharding
from jaxinfer.engine import runner as runner_lib
from jaxinfer.lora.adapter import random_adapter
from jaxinfer.models import formats

TOL = 1e-5  # float32 logits, largest per-row relative error against tp = 1 (measured: under 1e-6)
# The Pallas kernels per shard and speculation run in the fast tier on a one-layer model
# (tp_checks._small_model), in the slow tier on the tiny model.
FAST_CHECKS = ("forward_logits", "engine_greedy", "pallas_per_shard_small", "speculative_small", "expert_parallel_small")
COMPILE_FLAGS = os.environ.get("XLA_FLAGS", "")  # conftest.py's, set before this module is imported
XLA_FLAGS = f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}"


def _env(xla_flags: str) -> dict:
    # PYTHONPATH: this checkout's jaxinfer, whichever one is installed.
    return {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}


def _run_checks(*names: str) -> dict:
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "tp_checks.py"), *names], cwd=REPO,
                            env=_env(XLA_FLAGS), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("error")
    return result


@pytest.fixture(scope="module")
def checks() -> dict:
    return _run_checks(*FAST_CHECKS)


def test_sharded_forward_logits_equal_unsharded(checks):
    errors = _ok(checks["forward_logits"])["max_row_error"]
    # tiny: 2 KV heads (replicated at tp 4), tied head, vocabulary 258 (padded at tp 4); gqa: 4 KV heads
    # (replicated at tp 8), q/k/v biases, an untied head, vocabulary 250 (padded at tp 8).
    assert set(errors) == {"tiny_tp2", "tiny_tp4", "gqa_tp8"}
    assert max(errors.values()) <= TOL, errors


def test_engine_greedy_tokens_equal_across_tp(checks):
    tokens = _ok(checks["engine_greedy"])["tokens"]
    assert tokens["1"] == tokens["2"] == tokens["4"] and len(tokens["1"][0]) == 8


def test_warmed_up_engine_compiles_nothing_new(checks):
    result = _ok(checks["engine_greedy"])
    assert result["new_traces"] == {}  # runner.TRACE_COUNTS unchanged by the run
    assert result["new_compiles"] == {}  # and no XLA compilation at all (a sharding mismatch would show here)


def test_per_device_bytes_fall_with_tp(checks):
    memory_ = _ok(checks["engine_greedy"])["bytes_per_device"]
    cfg = ji.ModelConfig.from_json_file(os.path.join(ji.checkpoints.weights.ASSETS_DIR, "tiny", "config.json"))
    L, D, F, N, K, H = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim)
    for tp in (1, 2, 4):
        # wq, wo and the MLP split 1/tp; wk, wv hold max(K / tp, 1) heads (replicated past K); norms whole.
        floats = L * ((2 * D * N * H + 3 * D * F) // tp + 2 * D * H * max(K // tp, 1) + 2 * D)
        assert memory_[str(tp)]["layers"] == 4 * floats, tp  # float32
    assert memory_["2"]["params"] < memory_["1"]["params"] / 2 * 1.01
    # The cache: its 2 KV heads split at tp 2; at tp 4 each is stored twice, one head per device.
    cache = {tp: memory_[str(tp)]["cache"] for tp in (1, 2, 4)}
    assert cache[2] == cache[1] // 2 and cache[4] == cache[1] // 2
    assert memory_["2"]["cache_spec"] == "P(None, 'tp')" and memory_["4"]["devices"] == 4


@pytest.mark.slow  # 4 s in the checks' process, and one process more: the fast tier stays under 5 minutes
def test_int4_weights_lora_and_int8_kv_under_tp2(checks):
    result = _ok(_run_checks("int4_lora_kv_int8")["int4_lora_kv_int8"])
    tokens = result["tokens"]
    assert tokens["1"] == tokens["2"]
    assert tokens["1"][0] != _ok(checks["engine_greedy"])["tokens"]["1"][0]  # the adapter changes its row
    specs = result["specs"]
    assert specs["wq.qweight"] == "P(None, None, 'tp')"  # column-parallel: output columns
    assert specs["w_down.qweight"] == specs["w_down.scales"] == "P(None, 'tp', None)"  # row: whole groups
    assert specs["k_scale"] == "P(None, 'tp')"
    assert (specs["lora.a.wq"], specs["lora.b.wq"]) == ("P()", "P(None, None, None, 'tp')")
    assert (specs["lora.a.wo"], specs["lora.b.wo"]) == ("P(None, None, 'tp', None)", "P()")


@pytest.mark.slow
def test_logprobs_equal_across_tp():
    result = _ok(_run_checks("logprobs")["logprobs"])
    assert result["tokens_equal"] and result["same_top"] and result["entries"] == 25 + 2 * 6  # prompts, tokens
    assert result["max_abs_error"] <= 1e-4, result


@pytest.mark.slow
def test_structured_output_equal_across_tp():
    tokens = _ok(_run_checks("structured")["structured"])["tokens"]
    assert tokens["tp2"] == tokens["tp1"] and tokens["ngram_tp2"] == tokens["tp1"]
    assert len(tokens["tp1"][0]) > 4  # the JSON row ran


@pytest.mark.slow
def test_lora_over_replicated_kv_heads():
    tokens = _ok(_run_checks("lora_replicated_kv_heads")["lora_replicated_kv_heads"])["tokens"]
    assert tokens["1"] == tokens["4"]


def test_pallas_kernels_per_shard_on_a_small_model(checks):
    result = _ok(checks["pallas_per_shard_small"])
    assert result["tokens"]["pallas_tp2"] == result["tokens"]["xla_tp1"]
    assert {"run", "kernel"} <= set(result["shard_maps"]), result["shard_maps"]


def test_speculative_decoding_under_tp_on_a_small_model(checks):
    result = _ok(checks["speculative_small"])
    assert result["tokens"]["ngram_tp2"] == result["tokens"]["plain_tp1"] and result["spec_passes"] > 0


@pytest.mark.slow
def test_pallas_kernels_per_shard():
    result = _ok(_run_checks("pallas_per_shard")["pallas_per_shard"])
    assert result["tokens"]["pallas_tp2"] == result["tokens"]["xla_tp1"]
    assert max(result["act_order_row_error"].values()) <= TOL
    # Every kernel the step runs went through shard_map: decode and prefill attention, the matmul.
    assert {"run", "kernel"} <= set(result["shard_maps"]), result["shard_maps"]


@pytest.mark.slow
def test_speculative_decoding_under_tp(checks):
    tokens = _ok(_run_checks("speculative")["speculative"])["tokens"]
    plain = _ok(checks["engine_greedy"])["tokens"]["1"]
    assert tokens["ngram_tp2"] == tokens["eagle_tp4"] == tokens["eagle3_tp2"] == plain
    assert tokens["eagle_tp4_tokens_per_pass"] > 1 and tokens["eagle3_tp2_tokens_per_pass"] > 1


@pytest.mark.slow
def test_new_families_under_tp2():
    """Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen3-MoE, Qwen2-MoE, gpt-oss and DeepSeek-V2 / V3 (MLA) split over two devices: logits within TOL of
    tp = 1, the same greedy tokens through the XLA and the per-shard Pallas attention."""
    result = _ok(_run_checks("families")["families"])
    assert max(result["max_row_error"].values()) <= TOL, result["max_row_error"]
    assert set(result["tokens"]) == {"gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss",
                                     "gpt_oss_mxfp4", "mixtral_int4_experts", "deepseek_v2", "deepseek_v3",
                                     "deepseek_v3_moe"}
    for name, tokens in result["tokens"].items():
        assert tokens["tp2"] == tokens["tp1"] == tokens["pallas_tp2"], name
        assert len(tokens["tp1"][0]) == 8


def _check_expert_parallel(result: dict, names: set[str], full: bool) -> None:
    """Logits within TOL of the unplaced model at every (tp, ep); the same greedy tokens at ep = 1, 2,
    tp = 2 x ep = 2 (Pallas per shard; full: with int8 KV, against int8 KV at ep = 1) and (full)
    ep = 4 under prompt lookup; each device holds 1 / (tp x ep) of the expert weights."""
    assert max(result["max_row_error"].values()) <= TOL, result["max_row_error"]
    assert set(result["tokens"]) == names
    for name, tokens in result["tokens"].items():
        assert tokens["ep1"] == tokens["ep2"], name
        assert tokens["pallas_tp2_ep2"] == tokens["int8_ep1" if full else "ep1"], name
        if full:
            assert tokens["ngram_ep4"] == tokens["ep1"], name
        assert len(tokens["ep1"][0]) == 8
        whole = result["expert_bytes"][f"{name}_tp1_ep1"]
        for key, nbytes in result["expert_bytes"].items():
            if key.startswith(f"{name}_tp"):
                tp, ep = (int(part[2:]) for part in key[len(name) + 1:].split("_"))
                assert nbytes == whole // (tp * ep), (key, nbytes, whole)


def test_expert_parallel_on_mixtral(checks):
    """Mixtral's 4 experts split over ep = 2 and 4, alone and beside tp = 2 (all 8 devices)."""
    _check_expert_parallel(_ok(checks["expert_parallel_small"]), {"mixtral"}, full=False)


@pytest.mark.slow
def test_expert_parallel_every_moe_family():
    """Mixtral, Qwen3-MoE, Qwen2-MoE (a shared expert), gpt-oss (expert biases), its MXFP4 experts and
    Mixtral's int4 experts under ep."""
    _check_expert_parallel(_ok(_run_checks("expert_parallel")["expert_parallel"]),
                           {"mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "gpt_oss_mxfp4", "mixtral_int4_experts"},
                           full=True)


@pytest.mark.slow  # 8 s: the fast tier stays under 5 minutes on the 2-core CPU (CI runs both)
def test_two_processes_run_one_generation(checks):
    """Two processes on localhost, one CPU device each, tensor parallel over both through
    jax.distributed (gloo collectives): the tokens of a single process at tp = 1. In the fast tier
    on the tiny model itself: its processes cost what a smaller model's would (about 4.5 s of CPU
    each, 2 of them importing jax)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    script = os.path.join(REPO, "tests", "tp_checks.py")
    env = _env(COMPILE_FLAGS)
    procs = [subprocess.Popen([sys.executable, script, "--distributed", port, str(i), "2"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    expected = _ok(checks["engine_greedy"])["tokens"]["1"]
    for r in results:
        assert (r["devices"], r["local_devices"]) == (2, 1) and r["tokens"] == expected


# In this process (one device) -------------------------------------------------------------------


def test_bad_tp_refused_before_compiling():
    cfg = ji.ModelConfig(num_heads=8, num_kv_heads=2, intermediate_size=96)
    with pytest.raises(ValueError, match="tp=3 does not divide num_heads=8"):
        sharding.kv_replicas(cfg, 3)
    with pytest.raises(ValueError, match="intermediate_size=100"):
        sharding.kv_replicas(ji.ModelConfig(num_heads=8, num_kv_heads=2, intermediate_size=100), 8)
    with pytest.raises(ValueError, match="num_kv_heads=4"):
        sharding.kv_replicas(ji.ModelConfig(num_heads=24, num_kv_heads=4, intermediate_size=96), 6)
    assert sharding.kv_replicas(cfg, 8) == 4 and sharding.kv_replicas(cfg, 2) == 1
    with pytest.raises(ValueError, match="tp=0"):
        ji.EngineConfig(tp=0)
    with pytest.raises(ValueError, match="lora_impl='pallas' with tp=2"):
        ji.EngineConfig(tp=2, max_adapters=2, lora_impl="pallas")
    model = ji.Model(cfg, ji.init_params(cfg, jax.random.key(0)))
    before = sum(runner_lib.TRACE_COUNTS.values())
    with pytest.raises(ValueError, match=f"tp=2 is more than the {jax.device_count()} devices present"):
        ji.Engine(model, ji.EngineConfig(tp=2))
    with pytest.raises(ValueError, match="needs 2 devices"):
        sharding.make_mesh(2)
    assert sum(runner_lib.TRACE_COUNTS.values()) == before


def test_bad_ep_refused_before_compiling():
    for value in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"ep={value!r} must be an integer >= 1"):
            ji.EngineConfig(ep=value)
    with pytest.raises(ValueError, match="layer_loop='unroll' with ep=2"):
        ji.EngineConfig(ep=2, layer_loop="unroll")
    with pytest.raises(ValueError, match="ep=2: expert parallelism needs a mixture-of-experts model"):
        sharding.check(ji.ModelConfig(num_heads=8, num_kv_heads=2, intermediate_size=96), 1, ep=2)
    cfg = ji.ModelConfig.from_hf_dict({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
                                       "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 6,
                                       "num_experts_per_tok": 2})
    with pytest.raises(ValueError, match="ep=4 does not divide num_experts=6"):
        sharding.check(cfg, 1, ep=4)
    model = ji.Model(cfg, ji.init_params(cfg, jax.random.key(0)))
    before = sum(runner_lib.TRACE_COUNTS.values())
    with pytest.raises(ValueError, match=f"tp=1 x ep=2 is more than the {jax.device_count()} devices present"):
        ji.Engine(model, ji.EngineConfig(ep=2))
    with pytest.raises(ValueError, match="tp=1 x ep=3 x dp=1 needs 3 devices"):
        sharding.make_mesh(1, ep=3)
    assert sum(runner_lib.TRACE_COUNTS.values()) == before


def _packed(groups: int, group_size: int, bits: int, n: int = 32) -> formats.QuantizedWeight:
    rows = groups * group_size * bits // 8
    return formats.QuantizedWeight(qweight=jnp.zeros((2, rows, n), jnp.uint8), scales=jnp.ones((2, groups, n)),
                                   zeros=None, perm=None, bits=bits, group_size=group_size,
                                   in_features=groups * group_size)


def test_packed_weights_split_by_whole_groups():
    specs = sharding.param_specs({"embed": None, "layers": {"wo": _packed(4, 32, 4), "wq": _packed(3, 32, 4)}}, 2)
    assert specs["layers"]["wo"].scales == sharding.P(None, "tp", None)  # row-parallel: groups with their rows
    assert specs["layers"]["wq"].scales == sharding.P(None, None, "tp")  # column-parallel: any groups
    per_channel = sharding.param_specs({"embed": None, "layers": {"w_down": _packed(1, 64, 8)}}, 2)
    assert per_channel["layers"]["w_down"].scales == sharding.P()  # int8's one scale row on every shard
    with pytest.raises(ValueError, match="layers.w_down: 3 groups of 32 input rows do not split evenly over tp=2"):
        sharding.param_specs({"embed": None, "layers": {"w_down": _packed(3, 32, 4)}}, 2)
    with pytest.raises(ValueError, match="layers.wo: per-channel int4"):
        sharding.param_specs({"embed": None, "layers": {"wo": _packed(1, 64, 4)}}, 2)


def test_widened_kv_heads_and_adapters():
    """KV head j becomes heads j * r .. j * r + r - 1, in the weights, packed fields and LoRA B alike."""
    cfg = ji.ModelConfig(num_heads=4, num_kv_heads=2, head_dim=4, hidden_size=8, intermediate_size=8, num_layers=1)
    params = ji.init_params(cfg, jax.random.key(1))
    wide = sharding.widen_kv(params, cfg, 2)["layers"]["wk"]  # (L, D, 4 * H)
    heads = np.asarray(params["layers"]["wk"]).reshape(1, 8, 2, 4)
    np.testing.assert_array_equal(wide.reshape(1, 8, 4, 4), heads[:, :, [0, 0, 1, 1]])
    adapter = sharding.widen_adapter(random_adapter(cfg, 2, ("wq", "wk")), cfg.head_dim, 2)
    np.testing.assert_array_equal(adapter.weights["wk", 0][1].reshape(2, 4, 4)[:, 2], adapter.weights["wk", 0][1]
                                  .reshape(2, 4, 4)[:, 3])
    assert adapter.weights["wq", 0][1].shape == (2, 16)  # query projections are left alone


def test_planner_per_card(tmp_path):
    llama70 = memory.load_model_config("llama3_70b")  # 64 heads, 8 KV heads
    assert memory.kv_bytes_per_token(llama70, "bfloat16", tp=4) * 4 == memory.kv_bytes_per_token(llama70, "bfloat16")
    # tp 16 > 8 KV heads: each card holds one (replicated), not half of one.
    assert memory.kv_bytes_per_token(llama70, "bfloat16", tp=16) * 8 == memory.kv_bytes_per_token(llama70, "bfloat16")
    whole, quarter = memory.weight_bytes(llama70, "bfloat16"), memory.weight_bytes(llama70, "bfloat16", tp=4)
    assert whole / 4 <= quarter < whole / 4 * 1.001  # norms replicated
    h100 = memory.load_hardware("h100_80gb")
    # 141 GB of bf16 weights: 2 cards of 77 GB usable hold 70.5 GB each but not 8 x 8,192 tokens of KV too.
    assert memory.min_tp(llama70, h100, batch=8, context=8192) == 4
    assert memory.min_tp(llama70, h100, batch=1, context=1024) == 2
    with pytest.raises(ValueError, match="tp=3 does not divide num_heads=64"):
        memory.kv_bytes_per_token(llama70, "bfloat16", tp=3)


def test_kv_capacity_tp_and_min_tp(tmp_path, capsys):
    out = tmp_path / "tp.json"
    argv = ["kv_capacity", "--models=llama3_70b,llama3_8b", "--cards=h100_80gb", "--tp=4", f"--out={out}"]
    with flagsaver.flagsaver():
        kv_capacity.FLAGS(argv)
        kv_capacity.main(argv[:1])
    printed = capsys.readouterr().out
    assert "per card of tp=4" in printed
    rows = {r["model"]: r for r in json.loads(out.read_text())["cards"]["h100_80gb"]["rows"]}
    assert rows["llama3_70b"]["fits"] and rows["llama3_70b"]["tp"] == 4
    assert rows["llama3_70b"]["weight_bytes"] == memory.weight_bytes(memory.load_model_config("llama3_70b"),
                                                                     "bfloat16", 4)
    argv = ["kv_capacity", "--models=llama3_70b", "--cards=h100_80gb,rtx4000ada_20gb", "--min_tp", "--context=8192",
            "--batch=8", f"--out={out}"]
    with flagsaver.flagsaver():
        kv_capacity.FLAGS(argv)
        kv_capacity.main(argv[:1])
    printed = capsys.readouterr().out
    cards = json.loads(out.read_text())["cards"]
    assert cards["h100_80gb"]["rows"][0]["min_tp"] == 4 and "smallest tp for 8 x 8,192 tokens" in printed
    argv = ["kv_capacity", "--models=mixtral_8x7b,llama3_8b", "--cards=rtx3080_10gb", "--ep=8",
            "--weight_format=int4-g128", f"--out={out}"]
    with flagsaver.flagsaver():
        kv_capacity.FLAGS(argv)
        kv_capacity.main(argv[:1])
    assert "experts over ep=8" in capsys.readouterr().out
    rows = {r["model"]: r for r in json.loads(out.read_text())["cards"]["rtx3080_10gb"]["rows"]}
    mixtral = memory.load_model_config("mixtral_8x7b")
    assert rows["mixtral_8x7b"]["weight_bytes"] == memory.weight_bytes(mixtral, "int4-g128", ep=8)
    assert rows["mixtral_8x7b"]["fits"] and not memory.fits(mixtral, memory.load_hardware("rtx3080_10gb"), 1, 1024,
                                                             "int4-g128")
    assert "expert parallelism needs a mixture-of-experts model" in rows["llama3_8b"]["error"]
    ada = cards["rtx4000ada_20gb"]["rows"][0]
    assert ada["min_tp"] == 16 and ada["weight_bytes_per_card"] + ada["kv_bytes_per_card"] <= 0.9 * 21.5e9


def test_data_parallel_replicas_take_tp_x_ep_devices():
    """experiments.serve --data_parallel: replica i's devices are the i-th group of tp x ep."""
    from experiments import serve

    with flagsaver.flagsaver():
        serve.FLAGS(["serve", "--data_parallel=2", "--tp=2", "--ep=2"])
        assert serve.replica_env(1) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
