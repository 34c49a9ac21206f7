"""DeepSeek-V2 / V3 multi-head latent attention (jaxinfer.models.deepseek), expanded form, against HF
transformers on small random configs: logits (float32, per row) and 32 greedy tokens through the
paged engine, with chunked prefill, prefix-cache hits and preemption; int8 KV; config.json read and
written as HF reads it; what is refused. Tensor parallelism: tp_checks.py "families"."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from helpers import (
    TOLERANCE,
    check_saved_equals_hf_file,
    random_hf_model,
    row_rel_error,
    save_hf,
)

import jaxinfer as ji
from jaxinfer import memory
from jaxinfer.models.config import ConfigError, ModelConfig

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=3, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
# V2-Lite's shape (no query latent); V3's (a query latent); V2 with DeepSeek's YaRN (mscale, mscale_all_dim:
# the attention factor on the rotary tables and the softmax scale's correction).
# DeepSeek's experts after one dense layer: V2's softmax scores chosen among the 2 best of 4 groups by
# their best expert; V3's sigmoid scores with a learned correction, groups by their best two, the
# weights renormalised and scaled.
EXPERTS = dict(first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4,
               topk_group=2)
CASES = {
    "v2_lite": ("deepseek_v2", dict(q_lora_rank=None)),
    "v3": ("deepseek_v3", dict(q_lora_rank=24, v_head_dim=16)),
    "v2_moe": ("deepseek_v2", dict(q_lora_rank=None, **EXPERTS, n_shared_experts=2, topk_method="group_limited_greedy",
                                   routed_scaling_factor=1.5)),
    "v3_moe": ("deepseek_v3", dict(q_lora_rank=24, **EXPERTS, n_shared_experts=1, routed_scaling_factor=2.5,
                                   norm_topk_prob=True)),
    "v2_yarn": ("deepseek_v2", dict(q_lora_rank=24, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707,
        beta_fast=32, beta_slow=1))),
}


def _hf_model(case: str, seed: int = 0):
    model_type, extra = CASES[case]
    return random_hf_model(model_type, seed, **{**BASE, **extra})


SLOW_CASES = ("v2_lite", "v3")  # the MoE cases run the same attention (with and without a query latent)


@pytest.fixture(scope="module", params=[pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                        for c in sorted(CASES)])
def pair(request, tmp_path_factory):
    """(case, HF model, its checkpoint's path, our model loaded from it)."""
    hf = _hf_model(request.param, seed=sorted(CASES).index(request.param))
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, path, ji.load_model(path)


def _hf_greedy(hf, prompt: list[int], n: int = 32) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_config_reads_as_hf_reads_it(pair):
    case, hf, _, model = pair
    cfg, hfc = model.config, hf.config
    assert cfg.head_dim == hfc.qk_head_dim and cfg.rotary_dim == hfc.qk_rope_head_dim
    assert cfg.num_kv_heads == cfg.num_heads and cfg.v_head_dim == hfc.v_head_dim
    assert cfg.q_lora_rank == (hfc.q_lora_rank or 0) and cfg.kv_lora_rank == hfc.kv_lora_rank
    correction = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))  # V3's
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters()) + correction
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    if case == "v2_yarn":
        assert cfg.rope.type == "yarn" and cfg.attention_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)
        assert cfg.attention_scale != cfg.head_dim ** -0.5
    else:
        assert cfg.attention_scale is None


def test_logits_match_hf(pair, rng):
    case, hf, _, model = pair
    tokens = rng.integers(0, model.config.vocab_size, size=(2, 40), dtype=np.int64)
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    assert row_rel_error(np.asarray(ji.forward_logits(model, tokens)), expected) <= TOLERANCE["float32"], case


def test_greedy_tokens_match_hf_through_the_engine(pair, rng, request):
    """32 greedy tokens of prompts of different lengths batched together, through an engine with
    4-token pages, 8-token prefill chunks, a shared prefix (prefix-cache hits) and too few pages for
    all of them at once (preemption)."""
    case, hf, _, model = pair
    if case in ("v2_moe", "v2_yarn") and not request.config.getoption("--runslow"):
        pytest.skip("slow: run with --runslow (the fast tier keeps V3 with experts through the engine)")
    prefix = rng.integers(0, model.config.vocab_size, size=9).tolist()
    prompts = [prefix + rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (2, 7, 4)]
    expected = [_hf_greedy(hf, p) for p in prompts]
    sp = ji.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    engine = ji.Engine(model, ji.EngineConfig(max_batch=3, page_size=4, max_tokens_per_step=8, num_pages=24,
                                              max_seq_len=48))
    assert [o.token_ids for o in engine.generate(prompts, sp)] == expected, case
    assert engine.allocator.hits > 0 and engine.stats["preemptions"] > 0, engine.metrics()


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """(HF model, ours) of the V3 case (a query latent, V narrower than K)."""
    hf = _hf_model("v3", seed=7)
    return hf, ji.load_model(save_hf(hf, tmp_path_factory.mktemp("v3")))


@pytest.mark.parametrize("decode, prefill, attention", [
    ("absorbed", "absorbed", "pallas"),  # (absorbed decode, expanded prefill on XLA: the engine's default, above)
    pytest.param("absorbed", "expanded", "xla", marks=pytest.mark.slow),
    pytest.param("expanded", "absorbed", "xla", marks=pytest.mark.slow),
    pytest.param("expanded", "expanded", "pallas", marks=pytest.mark.slow)])
def test_every_form_over_the_latent_cache_gives_hf_tokens(v3, rng, decode, prefill, attention):
    """The engine's cache holds one latent row per token and layer; decode steps and prompt chunks
    attend over it absorbed or expanded, through XLA or the Pallas kernels (interpret mode): HF's
    greedy tokens, with 8-token chunks over 4-token pages and a prefix-cache hit."""
    hf, model = v3
    prefix = rng.integers(0, model.config.vocab_size, size=9).tolist()
    prompts = [prefix + rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (3, 6)]
    engine = ji.Engine(model, ji.EngineConfig(max_batch=2, page_size=4, max_tokens_per_step=8, max_seq_len=48,
                                              attention=attention, mla_decode=decode, mla_prefill=prefill))
    cfg = model.config
    assert engine.runner.cache.latent and engine.runner.cache.k.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    sp = ji.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(prompts, sp)] == [_hf_greedy(hf, p) for p in prompts]
    assert engine.allocator.hits > 0


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="mla_decode='latent' is not one of"):
        ji.EngineConfig(mla_decode="latent")


@pytest.mark.parametrize("kv_dtype", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_quantised_latent_cache_equals_the_fake_quantised_reference(v3, rng, monkeypatch, kv_dtype):
    """An int8 / fp8 latent cache (one scale per token's row) gives the tokens a float latent cache
    gives when every row written into it is quantised and dequantised first: the same numerics,
    through the absorbed decode and the expanded prefill (which reads the context back from the
    pages); a sampled request with n = 3 forks its pages (copy-on-write, scales too)."""
    from jaxinfer.models import latent_attention
    from jaxinfer.models.kv_cache import KV_DTYPES, fake_quantize

    _, model = v3
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (6, 11, 6)]
    params = [ji.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * 2 + [
        ji.SamplingParams(max_tokens=16, temperature=0.8, n=3, seed=1, ignore_eos=True)]
    config = dict(max_batch=4, page_size=4, max_tokens_per_step=8, max_seq_len=48)
    engine = ji.Engine(model, ji.EngineConfig(kv_dtype=kv_dtype, **config))
    outs = [[s.token_ids for s in o.samples or [o]] for o in engine.generate(prompts, params)]
    assert engine.runner.cache.latent and engine.runner.cache.dtype == KV_DTYPES[kv_dtype]
    assert engine.stats["copied_pages"] > 0
    attend_latent = latent_attention.attend_latent

    def fake_quantised(cache, layer, q, latent, *args, **kwargs):
        rows = fake_quantize(latent.rows, KV_DTYPES[kv_dtype])
        return attend_latent(cache, layer, q, latent._replace(rows=rows), *args, **kwargs)

    monkeypatch.setattr(latent_attention, "attend_latent", fake_quantised)
    jax.clear_caches()  # no float-cache program compiled before the patch may serve the reference
    reference = ji.Engine(model, ji.EngineConfig(**config)).generate(prompts, params)
    jax.clear_caches()
    assert outs == [[s.token_ids for s in o.samples or [o]] for o in reference]


def test_saved_checkpoint_equals_hf_file(pair, tmp_path):
    _, _, path, model = pair
    check_saved_equals_hf_file(model, path, tmp_path / "ours")


def test_kv_bytes_are_the_latent_rows():
    """A latent cache holds kv_lora_rank + qk_rope_head_dim values per token and layer, whatever the
    heads, the same on every tp card; the engine's pages have that shape."""
    cfg = ModelConfig.from_hf_dict({**BASE, "model_type": "deepseek_v2", "q_lora_rank": None})
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert memory.kv_bytes_per_token(cfg, "bfloat16") == cfg.num_layers * row * 2
    assert memory.kv_bytes_per_token(cfg, "int8", kv_scale_bytes=4, tp=2) == cfg.num_layers * (row + 4)
    cache = ji.PagedKVCache.zeros(cfg, num_pages=5, page_size=4, kv_dtype="int8")
    assert cache.latent and cache.k.shape == (cfg.num_layers, 1, 5, 4, row) and cache.v.shape[-1] == 0


@pytest.mark.parametrize("change, message", [
    ({**EXPERTS, "n_group": 3, "topk_method": "group_limited_greedy"}, "n_group=3, topk_group=2"),
    ({**EXPERTS, "topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    ({**EXPERTS, "moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2 is not num_attention_heads=4"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7 must be even"),
    ({"v_head_dim": 64}, "v_head_dim=64"),
])
def test_unsupported_configs_are_refused_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**BASE, "model_type": "deepseek_v2", **change})


def test_v3_with_half_split_rotary_pairs_is_refused():
    with pytest.raises(ConfigError, match="rope_interleave=False"):
        ModelConfig.from_hf_dict({**BASE, "model_type": "deepseek_v3", "rope_interleave": False})


def test_bench_mla_forms_agree_and_count_bytes(tmp_path):
    """experiments.bench_mla on a small shape: both decode forms give the same output, and the
    expanded form's per-head keys and values outweigh the latent rows it reads."""
    import json

    from helpers import run_main

    from experiments import bench_mla

    out = tmp_path / "mla.json"
    run_main(bench_mla, "--contexts=16,40", "--mla_heads=4", "--kv_lora_rank=32", "--qk_rope_head_dim=8",
             "--qk_nope_head_dim=16", "--v_head_dim=12", "--runs=1", "--calls=1", f"--out={out}")
    rows = json.loads(out.read_text())["results"]
    assert [r["context"] for r in rows] == [16, 40]
    for r in rows:
        assert r["max_row_rel_diff"] <= 1e-5 and set(r["ms"]) == {"absorbed", "expanded"}
        assert r["per_token"]["cache_read"] == r["context"] * 40 * 4
        assert r["per_token"]["expanded_written_and_read"] > r["per_token"]["cache_read"]


@pytest.mark.slow  # a quantisation and two passes per case
def test_quantisation_of_mixed_layers(pair):
    """RTN int8 quantises every projection (the replicated ones too) over their own layers, and the
    packed model's logits equal its dequantised twin's (weight-only: the same weights); calibration-
    based schemes, which walk uniformly stacked layers, are refused naming the field for the MoE configs."""
    from helpers import row_rel_error

    from jaxinfer import quant

    case, _, _, model = pair
    q = quant.quantize_model(model, quant.scheme_from_name("int8"), progress=False)
    assert {"wkv_a", "wkv_b", "wo"} <= {n for n, w in q.params["layers"].items() if isinstance(w, quant.QuantizedWeight)}
    tokens = np.arange(24)[None] % model.config.vocab_size
    twin = ji.Model(model.config, quant.dequantize_params(q.params))
    assert row_rel_error(np.asarray(ji.forward_logits(q, tokens)), np.asarray(ji.forward_logits(twin, tokens))) < 1e-5
    if "moe" in case:
        with pytest.raises(ValueError, match="first_k_dense_replace=1"):
            quant.quantize_model(model, quant.scheme_from_name("int4-awq-g32"), np.zeros((2, 8), np.int32),
                                 progress=False)


def test_the_planner_counts_the_latent_against_gqa():
    """DeepSeek-V2-Lite's published config: L x (kv_lora_rank + qk_rope_head_dim) x 2 bytes a token in
    bfloat16, 3.2x under Qwen3-30B-A3B's GQA; the seed-claims row after GQA says so."""
    from experiments import seed_claims

    lite = memory.load_model_config("deepseek_v2_lite")
    assert memory.kv_bytes_per_token(lite, "bfloat16") == 27 * (512 + 64) * 2 == 31_104
    assert memory.kv_bytes_per_token(memory.load_model_config("qwen3_30b_a3b"), "bfloat16") == 98_304
    verdict = seed_claims.mla(None)
    assert verdict.verdict == "holds" and "31,104" in verdict.figure and "22,452 tokens" in verdict.figure


@pytest.mark.slow  # an engine with adapter slots and the merged model's
def test_lora_on_the_attention_matches_the_merged_model(pair, rng):
    """LoRA adapts the projections every layer has (the query path, wkv_a, wo; not wkv_b, whose heads
    the absorbed attention reads whole, nor the MLP projections of some layers only): through the
    engine's latent cache, the merged model's greedy tokens."""
    from jaxinfer import lora
    from jaxinfer.lora.adapter import model_modules, random_adapter

    case, _, _, model = pair
    cfg = model.config
    assert "wkv_b" not in model_modules(cfg) and "wkv_a" in model_modules(cfg)
    assert ("w_gate" in model_modules(cfg)) == (not cfg.num_experts)
    adapter = random_adapter(cfg, 4, std=0.1, seed=3, name="a")
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (5, 9)]
    sp = ji.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = ji.Engine(model, ji.EngineConfig(max_batch=2, max_seq_len=32, max_adapters=1))
    engine.add_adapter("a", adapter)
    outs = engine.generate(prompts, sp, adapters=["a"] * len(prompts))
    merged = ji.generate(lora.merge(model, adapter), prompts, sp)
    assert [o.token_ids for o in outs] == [m.token_ids for m in merged], case
