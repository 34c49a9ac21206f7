"""Test helpers: per-row error metrics, random HF checkpoints written to disk, and experiments run
in this process."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
from absl.testing import flagsaver
from hypothesis import HealthCheck, settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel tests run compiled on a GPU and in interpret mode elsewhere (poisoned outputs, see the
# kernel tests, are an interpret-mode guard; compiled runs check the values only).
INTERPRET = jax.default_backend() != "gpu"

# Property tests (kernels, engine workloads): each draws inputs with hypothesis, derandomised (the
# same cases on every run). The fast tier runs a test's explicit @example()s, the hard shapes
# (ragged lengths, page boundaries, GQA ratios, one-token sequences), then `draws(n)` drawn cases;
# the slow tier runs the same check again under the "thorough" profile: many more drawn cases.
settings.register_profile("thorough", max_examples=50, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
THOROUGH = settings.get_profile("thorough")


def draws(n: int) -> settings:
    """The fast tier's settings: n drawn cases after the explicit examples."""
    return settings(THOROUGH, max_examples=n)


# Largest per-row relative error allowed, by dtype. bfloat16 keeps 8 significant bits: one rounding
# costs up to 2**-9 (2e-3) relative. A kernel and its reference round at different points (measured:
# up to 3.3e-3 per row in test_paged_attention's bf16 cases), and a bf16 model's logits sit about
# 1e-2 per row from float32's on random weights, HF transformers' own bf16 alike (test_hf_parity,
# measured 0.010-0.012 mean): 2e-2 bounds both with room for longer sums.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# Named HF configurations, each exercising a feature of the Llama family.
ARCHS = {
    "llama": ("llama", dict(rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama3_rope_bias": (
        "llama",
        dict(
            attention_bias=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama_linear_rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral_window": ("mistral", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("qwen2", dict(num_key_value_heads=4)),
    "qwen3": ("qwen3", dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2)),
    # Gemma 2: soft-capped scores and logits, a query scale of its own, local and global layers.
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                              final_logit_softcapping=4.0)),
    # Gemma 3: q/k norms, the local layers' own RoPE base, one global layer in two.
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, num_hidden_layers=4,
                                   sliding_window_pattern=2, rope_parameters={
                                       "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # Phi-3: q/k/v and gate/up stored fused (split at load), a sliding window on every layer.
    "phi3": ("phi3", dict(sliding_window=7)),
    # Mixture of experts: 4 experts, 2 per token (Mixtral renormalises them; Qwen3-MoE here too).
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                                    norm_topk_prob=True)),
    # Qwen2-MoE: a shared expert beside the routed ones, q/k/v biases, top-k probabilities not renormalised.
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=40, norm_topk_prob=False)),
    # gpt-oss: attention sinks, biased router and experts, a SwiGLU clamp small enough to bite, local and
    # global layers, YaRN RoPE (its frequency ramp and attention factor inside 64 positions).
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, head_dim=16,
                                num_hidden_layers=4, sliding_window=5, swiglu_limit=0.5, rope_parameters=dict(
                                    rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=8.0, beta_slow=1.0,
                                    truncate=False, original_max_position_embeddings=16))),
}


def row_errors(actual, expected) -> np.ndarray:
    """||a - e|| / ||e|| for every row (the last axis holds a row's features)."""
    a = np.asarray(actual, np.float64).reshape(-1, np.shape(actual)[-1])
    e = np.asarray(expected, np.float64).reshape(-1, np.shape(expected)[-1])
    num = np.linalg.norm(a - e, axis=-1)
    den = np.maximum(np.linalg.norm(e, axis=-1), 1e-30)
    return num / den


def assert_rows_close(actual, expected, tolerance: float) -> None:
    """Same shape, every element finite (an unwritten poisoned output is NaN), every row's
    relative error within tolerance."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all(), "unwritten or non-finite output"
    errors = row_errors(actual, expected)
    assert errors.max() <= tolerance, f"max row error {errors.max():.3g}"


def row_rel_error(actual, expected) -> float:
    """The largest per-row relative error."""
    return float(np.max(row_errors(actual, expected)))


def hf_model(arch: str, seed: int = 0, **overrides):
    """A randomly initialised HF model (torch, float32, eval mode) for a named architecture."""
    model_type, extra = ARCHS[arch]
    return random_hf_model(model_type, seed, **{**TINY, **extra, **overrides})


def random_hf_model(model_type: str, seed: int = 0, **kwargs):
    """An HF model of `model_type` built from config kwargs (torch, float32, eval mode, eager
    attention), its parameters drawn from `seed`; DeepSeek-V3's routing correction (a buffer) too."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(model_type).__class__(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            # HF initialises biases to 0 and norms to 1; perturb both so every path is exercised.
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
        for name, b in model.named_buffers():  # (zeros as HF initialises it)
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=generator))
    return model


def save_hf(model, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return str(path)


def run_main(module, *argv: str) -> None:
    """Run an experiment's main in this process with these flags (the others at their defaults);
    the global flags are restored afterwards. Bad input raises as it would inside main."""
    with flagsaver.flagsaver():
        module.FLAGS(["experiment", *argv])
        module.main(["experiment"])


def run_script(module: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m <module> argv...` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def spy_proposals(engine) -> list[tuple[list[list[int]], np.ndarray]]:
    """Every proposal the engine's drafter makes from now on, as (each sequence's tokens at the
    time, the drafts (sequences, k)), appended to the list returned."""
    seen, propose = [], engine.drafter.propose

    def spy(seqs, *args):
        proposal = propose(seqs, *args)
        seen.append(([list(s.tokens) for s in seqs], np.asarray(proposal.tokens)[: len(seqs)]))
        return proposal

    engine.drafter.propose = spy
    return seen


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """HF transformers' n greedy tokens after one prompt."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def check_engine_paths_against_hf_greedy(hf, model, engine_config: dict, rng) -> None:
    """Prompts longer than a window of 5, in chunks of 8 tokens over pages of 4, a prefix-cache hit
    (the third prompt starts with the first), 16 greedy tokens each: HF's tokens, except that a
    quantised KV cache may part from them (its agreement is counted, as for other models' int8 KV)."""
    import jaxinfer as ji

    prompts = [rng.integers(0, 256, size=n).tolist() for n in (13, 6)]
    prompts.append(prompts[0][:8] + [3, 4, 5])
    engine = ji.Engine(model, ji.EngineConfig(max_batch=2, page_size=4, max_tokens_per_step=8, **engine_config))
    outs = engine.generate(prompts, ji.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert engine.allocator.hits > 0
    expected = [hf_greedy(hf, p, 16) for p in prompts]
    if "kv_dtype" in engine_config:
        agree = np.mean([a == b for o, e in zip(outs, expected) for a, b in zip(o.token_ids, e)])
        assert agree >= 0.5, agree
    else:
        assert [o.token_ids for o in outs] == expected


def check_saved_equals_hf_file(model, hf_path, out_dir) -> None:
    """save_hf_checkpoint(model) writes HF's model.safetensors back, tensor for tensor."""
    import safetensors.numpy

    import jaxinfer as ji

    ji.save_hf_checkpoint(model, out_dir)
    theirs = safetensors.numpy.load_file(f"{hf_path}/model.safetensors")
    ours = safetensors.numpy.load_file(f"{out_dir}/model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
