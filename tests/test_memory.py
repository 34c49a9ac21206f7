"""KV-cache and weight byte formulas, capacity planner, decode roofline, and the kv_capacity script."""

from __future__ import annotations

import json

import pytest
from absl.testing import flagsaver
from helpers import run_script

from experiments import kv_capacity
from jaxinfer import memory
from jaxinfer.models.config import ModelConfig


def _config(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, **kwargs) -> ModelConfig:
    return ModelConfig(
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        hidden_size=num_heads * head_dim, layer_windows=(0,) * num_layers, **kwargs,
    )


@pytest.fixture(scope="module")
def llama3_8b() -> ModelConfig:
    return memory.load_model_config("llama3_8b")


def test_kv_cache_worked_example():
    cfg = _config()
    assert memory.kv_cache_bytes(cfg, 4096, kv_dtype="float16") == 2_147_483_648
    assert memory.kv_cache_bytes(cfg, 4096, batch=3, kv_dtype="float16") == 3 * 2_147_483_648
    assert memory.kv_cache_bytes(cfg, 4096, kv_dtype="float32") == 2 * 2_147_483_648
    assert memory.kv_cache_bytes(cfg, 4096, kv_dtype="int8") == 2_147_483_648 // 2


def test_gqa_cuts_kv_cache_by_group_size():
    mha = _config(num_heads=64, num_kv_heads=64)
    gqa = _config(num_heads=64, num_kv_heads=8)
    assert memory.kv_cache_bytes(mha, 4096) == 8 * memory.kv_cache_bytes(gqa, 4096)


def test_kv_scale_overhead():
    cfg = _config()
    plain = memory.kv_bytes_per_token(cfg, "int8")
    scaled = memory.kv_bytes_per_token(cfg, "int8", kv_scale_bytes=2)
    assert scaled - plain == 2 * 32 * 32 * 2  # K and V, per layer, per kv head, one float16 scale
    with pytest.raises(ValueError, match="kv_scale_bytes"):
        memory.kv_bytes_per_token(cfg, "bfloat16", kv_scale_bytes=2)


def test_llama3_8b_weight_bytes(llama3_8b):
    assert llama3_8b.num_params() == 8_030_261_248
    assert memory.weight_bytes(llama3_8b, "bfloat16") == 2 * 8_030_261_248
    assert memory.weight_bytes(llama3_8b, "bfloat16") == pytest.approx(16.06e9, rel=1e-3)
    assert memory.weight_bytes(llama3_8b, "float32") == 4 * 8_030_261_248


def test_quantised_weight_bytes_keep_embeddings_16_bit(llama3_8b):
    cfg = llama3_8b
    embeddings = 2 * cfg.vocab_size * cfg.hidden_size  # untied: embed_tokens and lm_head
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    linear = cfg.num_params() - embeddings - norms  # the quantised weights
    sixteen_bit = 2 * (embeddings + norms)
    assert memory.weight_bytes(cfg, "fp8") == sixteen_bit + linear + 4 * 7 * cfg.num_layers  # f32 scales
    int8 = memory.weight_bytes(cfg, "int8")
    int4 = memory.weight_bytes(cfg, "int4-g128")
    D, F, KH = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    fan_outs = D + KH + KH + D + F + F + D  # q, k, v, o, gate, up, down: one float16 scale each
    assert int8 == sixteen_bit + linear + cfg.num_layers * fan_outs * 2
    assert int4 == sixteen_bit + linear // 2 + (linear // 128) * 4  # float16 scale + zero per group
    assert memory.weight_bytes(cfg, "int4-g64") > int4 > memory.weight_bytes(cfg, "int4")
    assert memory.weight_bytes(cfg, "int8-g128") > int8


def test_tied_embeddings_counted_once():
    untied = _config(num_layers=2, vocab_size=1000)
    tied = _config(num_layers=2, vocab_size=1000, tie_word_embeddings=True)
    assert memory.weight_bytes(untied) - memory.weight_bytes(tied) == 2 * 1000 * 32 * 128


@pytest.mark.parametrize("card", ["rtx4000ada_20gb", "a100_40gb", "h100_80gb"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_max_context_is_the_largest_that_fits(llama3_8b, card, batch):
    hw = memory.load_hardware(card)
    n = memory.max_context(llama3_8b, hw, batch, "bfloat16", "bfloat16")
    assert n > 0
    assert memory.fits(llama3_8b, hw, batch, n, "bfloat16", "bfloat16")
    assert not memory.fits(llama3_8b, hw, batch, n + 1, "bfloat16", "bfloat16")


@pytest.mark.parametrize("card", ["rtx4000ada_20gb", "a100_40gb", "h100_80gb"])
@pytest.mark.parametrize("context", [1, 4096, 32768])
def test_max_batch_is_the_largest_that_fits(llama3_8b, card, context):
    hw = memory.load_hardware(card)
    b = memory.max_batch(llama3_8b, hw, context, "int8", "fp8", kv_scale_bytes=2)
    assert memory.fits(llama3_8b, hw, b, context, "int8", "fp8", kv_scale_bytes=2)
    assert not memory.fits(llama3_8b, hw, b + 1, context, "int8", "fp8", kv_scale_bytes=2)


def test_rtx3080_cannot_hold_llama3_8b_in_bf16_but_int4_fits(llama3_8b):
    hw = memory.load_hardware("rtx3080_10gb")
    with pytest.raises(memory.DoesNotFitError, match=r"16\.06 GB.*RTX 3080.*10\.74 GB.*9\.66 GB"):
        memory.max_context(llama3_8b, hw, 1, "bfloat16")
    with pytest.raises(ValueError, match="RTX 3080"):
        memory.max_batch(llama3_8b, hw, 4096, "bfloat16")
    assert not memory.fits(llama3_8b, hw, 1, 1, "bfloat16")
    assert memory.max_context(llama3_8b, hw, 1, "int4-g128") > 8192
    assert memory.max_batch(llama3_8b, hw, 4096, "int4-g128") >= 1


def test_decode_roofline_llama3_8b_on_h100(llama3_8b):
    hw = memory.load_hardware("h100_80gb")
    r = memory.decode_roofline(llama3_8b, hw, batch=1, context=4096)
    embed_table = llama3_8b.vocab_size * llama3_8b.hidden_size * 2
    assert r["weight_bytes_read"] == 2 * llama3_8b.num_params() - embed_table + llama3_8b.hidden_size * 2
    assert r["kv_bytes_read"] == memory.kv_cache_bytes(llama3_8b, 4096, kv_dtype="bfloat16")
    assert r["bound"] == "memory"
    assert r["tokens_per_s"] == pytest.approx(hw.memory_bandwidth_bytes_per_s / r["bytes_per_step"])
    assert 200 < r["tokens_per_s"] < 230
    big = memory.decode_roofline(llama3_8b, hw, batch=1024, context=128)
    assert big["bound"] == "compute"
    assert big["step_time_s"] == pytest.approx(big["flops_per_step"] / hw.peak_bf16_flops)
    measured = memory.decode_roofline(llama3_8b, hw, batch=1, context=4096, measured=True)
    assert measured["tokens_per_s"] < r["tokens_per_s"]
    with pytest.raises(ValueError, match="measured"):
        memory.decode_roofline(llama3_8b, memory.load_hardware("a100_80gb"), measured=True)


def test_sliding_window_bounds_kv_read():
    mistral = memory.load_model_config("mistral_7b")
    hw = memory.load_hardware("h100_80gb")
    short = memory.decode_roofline(mistral, hw, batch=1, context=4096)
    long = memory.decode_roofline(mistral, hw, batch=1, context=32768)
    assert short["kv_bytes_read"] == long["kv_bytes_read"]


# Published parameter counts (model cards), in billions.
PUBLISHED_PARAMS = {"llama2_7b": 6.74, "llama3_8b": 8.03, "llama3.1_8b": 8.03, "llama3_70b": 70.55,
                    "mistral_7b": 7.24, "qwen2.5_7b": 7.62, "qwen3_8b": 8.19, "smollm2_135m": 0.1345,
                    # the Gemma 3 report's text decoder: 1,416M embedding + 25,600M non-embedding (no vision encoder)
                    "gemma3_27b": 27.02, "mixtral_8x7b": 46.70, "qwen3_30b_a3b": 30.53,
                    "gpt_oss_20b": 20.91,  # the model card's 21B (HF's meta-device count, test_gpt_oss)
                    # the model cards' 15.7B and 671B (HF's meta-device counts, the correction biases
                    # included; 671B counts V3's 61 layers without its multi-token-prediction layer)
                    "deepseek_v2_lite": 15.71, "deepseek_v3": 671.03}


@pytest.mark.parametrize("name", memory.list_models())
def test_every_model_config_loads(name):
    cfg = memory.load_model_config(name)
    assert name in PUBLISHED_PARAMS, f"add {name}'s published parameter count"
    assert cfg.num_params() / 1e9 == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    assert memory.load_model_config(memory.CONFIGS_DIR / "models" / f"{name}.json") == cfg


def test_model_configs_present():
    assert {"llama3_8b", "llama2_7b", "mistral_7b", "qwen2.5_7b", "llama3_70b", "llama3.1_8b",
            "qwen3_8b"} <= set(memory.list_models())
    assert memory.load_model_config("llama3.1_8b").rope.type == "llama3"


@pytest.mark.parametrize("name", ["rtx3080_10gb", "rtx4000ada_20gb", "a100_40gb", "a100_80gb", "h100_80gb"])
def test_every_card_loads(name):
    hw = memory.load_hardware(name)
    assert hw.arch in ("ampere", "ada", "hopper")
    assert (hw.peak_fp8_flops is None) == (hw.arch == "ampere")
    assert hw.peak_bf16_flops < hw.peak_int8_ops
    assert (hw.measured is not None) == (name == "h100_80gb")
    assert memory.load_hardware(memory.CONFIGS_DIR / "hardware" / f"{name}.json") == hw


def test_bad_input_names_the_field(llama3_8b, tmp_path):
    hw = memory.load_hardware("h100_80gb")
    with pytest.raises(ValueError, match="card='rtx9090' is unknown.*h100_80gb"):
        memory.load_hardware("rtx9090")
    with pytest.raises(ValueError, match="model='llama9' is unknown"):
        memory.load_model_config("llama9")
    with pytest.raises(ValueError, match="kv_dtype='int3'"):
        memory.kv_cache_bytes(llama3_8b, 16, kv_dtype="int3")
    with pytest.raises(ValueError, match="weight_format='int4-g0'"):
        memory.weight_bytes(llama3_8b, "int4-g0")
    with pytest.raises(ValueError, match="weight_format='nf4'"):
        memory.max_context(llama3_8b, hw, 1, "nf4")
    with pytest.raises(ValueError, match="batch=0"):
        memory.max_context(llama3_8b, hw, 0)
    with pytest.raises(ValueError, match="batch=0"):
        memory.kv_cache_bytes(llama3_8b, 16, batch=0)
    with pytest.raises(ValueError, match="batch=0"):
        memory.decode_roofline(llama3_8b, hw, batch=0)
    with pytest.raises(ValueError, match="context=0"):
        memory.max_batch(llama3_8b, hw, 0)
    with pytest.raises(ValueError, match="reserve_fraction=1.0"):
        memory.max_context(llama3_8b, hw, 1, reserve_fraction=1.0)
    bad_card = tmp_path / "card.json"
    bad_card.write_text(json.dumps({"name": "x", "arch": "ampere"}))
    with pytest.raises(ValueError, match="memory_bytes"):
        memory.load_hardware(bad_card)


def test_kv_capacity_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "kv.json"
    argv = ["kv_capacity", "--models=llama3_8b,llama3_70b", "--cards=rtx3080_10gb,h100_80gb",
            "--batch=8", "--context=4096", f"--out={out}"]
    with flagsaver.flagsaver():
        kv_capacity.FLAGS(argv)
        kv_capacity.main(argv[:1])
    printed = capsys.readouterr().out
    assert "RTX 3080" in printed and "H100" in printed and "weights do not fit" in printed
    result = json.loads(out.read_text())
    h100 = {row["model"]: row for row in result["cards"]["h100_80gb"]["rows"]}
    assert result["metrics"]["h100_80gb/llama3_8b/max_batch_at_context"] == 114 and result["config"]["models"]
    # By hand: (80 GiB x 0.9 - 8.03e9 params x 2 B) / (4096 tokens x 2 x 32 layers x 8 heads x 128 x 2 B)
    # = (77,309,411,328 - 16,060,522,496) / 536,870,912 = 114.1
    assert h100["llama3_8b"]["max_batch_at_context"] == 114
    # Memory would hold 467,291 tokens of one sequence; the model's context (8,192) is the limit.
    assert h100["llama3_8b"]["max_context_batch_1"] == 8192 < h100["llama3_8b"]["kv_max_context_batch_1"]
    assert "8,192 (model)" in printed
    assert not h100["llama3_70b"]["fits"]
    assert not result["cards"]["rtx3080_10gb"]["rows"][0]["fits"]


@pytest.mark.slow  # 3 s: a subprocess; the fast tier runs kv_capacity's main in process
def test_kv_capacity_runs_as_a_script():
    result = run_script("experiments.kv_capacity", "--models=llama3_8b", "--cards=h100_80gb", timeout=120)
    assert result.returncode == 0 and "H100" in result.stdout, result.stderr[-2000:]
    bad = run_script("experiments.kv_capacity", "--models=llama3_8b", "--cards=h100_80gb", "--kv_dtype=int3",
                     timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_kv_capacity_rejects_bad_kv_dtype():
    argv = ["kv_capacity", "--models=llama3_8b", "--cards=h100_80gb", "--kv_dtype=int3"]
    with flagsaver.flagsaver():
        kv_capacity.FLAGS(argv)
        with pytest.raises(ValueError, match="kv_dtype"):
            kv_capacity.main(argv[:1])


def test_mixture_of_experts_planner():
    """Active parameters as the model cards state them (Mixtral-8x7B 12.9B of 46.7B, Qwen3-30B-A3B
    3.3B of 30.5B); every weight counted in weight_bytes, the experts quantised with the rest; a
    decode step reads the experts its tokens touch: k at batch 1, all E for a large batch."""
    mixtral, qwen = memory.load_model_config("mixtral_8x7b"), memory.load_model_config("qwen3_30b_a3b")
    assert memory.active_params(mixtral) / 1e9 == pytest.approx(12.88, abs=0.01)
    assert memory.active_params(qwen) / 1e9 == pytest.approx(3.35, abs=0.01)
    assert memory.weight_bytes(mixtral) == 2 * mixtral.num_params()
    expert = memory.expert_params(mixtral)
    assert expert == 3 * 4096 * 14336
    L, E = mixtral.num_layers, mixtral.num_experts
    # int4-g128: each expert matrix at 4 bits plus a float16 scale and zero per 128 inputs
    assert memory.weight_bytes(mixtral, "int4-g128") < memory.weight_bytes(mixtral) / 3.5
    hw = memory.load_hardware("h100_80gb")
    one = memory.decode_roofline(mixtral, hw, batch=1, context=1024)
    assert one["experts_touched_per_layer"] == 2
    untouched = L * (E - 2) * expert * 2  # bf16 bytes of the 6 experts per layer no token reads
    many = memory.decode_roofline(mixtral, hw, batch=256, context=1024)
    assert many["weight_bytes_read"] - one["weight_bytes_read"] == pytest.approx(untouched + 255 * 4096 * 2, rel=1e-6)
    assert memory.experts_touched(qwen, 8) == pytest.approx(128 * (1 - (1 - 8 / 128) ** 8))
    dense = memory.load_model_config("llama3_8b")
    assert memory.active_params(dense) == dense.num_params() and memory.experts_touched(dense, 64) == 0


def test_expert_parallel_planner():
    """ep: each card holds E / ep experts of every layer (the rest as at tp), and a decode step reads
    the touched experts among its own, touched / ep on average; an ep the experts do not split over
    is refused naming both numbers."""
    mixtral, hw = memory.load_model_config("mixtral_8x7b"), memory.load_hardware("h100_80gb")
    L, E, expert = mixtral.num_layers, mixtral.num_experts, memory.expert_params(mixtral)
    whole = memory.weight_bytes(mixtral)
    for tp, ep in ((1, 2), (1, 8), (2, 4)):
        experts_on_card = L * E * expert * 2 // (tp * ep)  # bf16
        rest_on_card = memory.weight_bytes(mixtral, tp=tp) - L * E * expert * 2 // tp
        assert memory.weight_bytes(mixtral, tp=tp, ep=ep) == experts_on_card + rest_on_card
    assert memory.weight_bytes(mixtral, ep=8) < whole / 4  # 46.7B of which 45.1B are experts
    one, split = (memory.decode_roofline(mixtral, hw, 1, 1024, ep=ep) for ep in (1, 4))
    # batch 1 touches 2 experts per layer; a card of ep = 4 holds 2 of 8 and reads half an expert on average
    assert one["weight_bytes_read"] - split["weight_bytes_read"] == pytest.approx(L * 1.5 * expert * 2, rel=1e-6)
    with pytest.raises(memory.DoesNotFitError, match="93.41 GB"):  # 46.7B in bf16 on one 80 GB card
        memory.max_context(mixtral, hw)
    assert memory.max_context(mixtral, hw, ep=2) > 100_000
    with pytest.raises(ValueError, match="ep=3 does not divide num_experts=8"):
        memory.weight_bytes(mixtral, ep=3)
    with pytest.raises(ValueError, match="ep=2: expert parallelism needs a mixture-of-experts model"):
        memory.weight_bytes(memory.load_model_config("llama3_8b"), ep=2)
