"""Speculative decoding is lossless: greedy output equals the plain engine's token for token for
every method; sampled output keeps the target's distribution (a chi-square test that rejects a
biased rule); rejected tokens' K/V are rolled back and every page comes back; bad configs are
refused before anything starts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_main, run_script

import jaxinfer as ji
from experiments import spec_decode
from jaxinfer import runner as runner_lib
from jaxinfer.sampling import SamplingBatch
from jaxinfer.speculative import accept as accept_lib
from jaxinfer.speculative import heads

GREEDY = ji.SamplingParams(max_tokens=24, temperature=0.0)


def chi_square_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of a two-sample chi-square test that samples a and b share one distribution."""
    values = np.union1d(a, b)
    table = np.stack([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    return float(jax.scipy.special.gammaincc((len(values) - 1) / 2, stat / 2))


# --- the acceptance rule alone ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rule_case():
    """Target logits at k + 1 positions, a draft distribution q, and drafts drawn from q, for many rows."""
    R, k, V = 4000, 3, 7
    rng = np.random.default_rng(0)
    logits = np.tile(rng.normal(size=(1, k + 1, V)) * 1.5, (R, 1, 1)).astype(np.float32)
    q = rng.dirichlet(np.ones(V), size=k)
    drafts = np.stack([rng.choice(V, size=R, p=q[j]) for j in range(k)], 1).astype(np.int32)
    sp = SamplingBatch.from_params([ji.SamplingParams(temperature=1.0)] * R, list(range(R)))
    p = np.asarray(jax.nn.softmax(logits[0], -1))
    return logits, drafts, np.tile(q[None], (R, 1, 1)).astype(np.float32), sp, p


def test_accepted_tokens_follow_the_target_distribution(rule_case):
    logits, drafts, q, sp, p = rule_case
    R, k = drafts.shape
    accepted, tokens = accept_lib.accept(logits, drafts, q, np.full(R, k, np.int32), sp, np.zeros(R, np.int32))
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)
    reference = np.random.default_rng(1).choice(p.shape[1], size=R, p=p[0])
    assert chi_square_p(tokens[:, 0], reference) > 1e-3
    second = tokens[accepted >= 1, 1]  # the token after an accepted first draft follows p at position 2
    assert chi_square_p(second, np.random.default_rng(2).choice(p.shape[1], size=len(second), p=p[1])) > 1e-3


def test_the_test_rejects_a_biased_rule(rule_case):
    """Negative control: accepting every draft emits the drafter's distribution, and the test says so."""
    logits, drafts, q, sp, p = rule_case
    reference = np.random.default_rng(1).choice(p.shape[1], size=len(drafts), p=p[0])
    assert chi_square_p(drafts[:, 0], reference) < 1e-6


def test_greedy_rule_keeps_the_argmax_prefix():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4, 9)), jnp.float32)
    best = np.asarray(jnp.argmax(logits, -1))
    drafts = np.stack([best[0, :3], [best[1, 0], (best[1, 1] + 1) % 9, best[1, 2]], best[2, :3]]).astype(np.int32)
    sp = SamplingBatch.from_params([ji.SamplingParams(temperature=0.0)] * 3, [0, 1, 2])
    accepted, tokens = accept_lib.accept(logits, drafts, None, np.array([3, 3, 1], np.int32), sp, np.zeros(3, np.int32))
    assert np.asarray(accepted).tolist() == [3, 1, 1]  # all; up to the wrong one; num_drafts caps the third
    assert np.asarray(tokens)[0].tolist() == best[0].tolist()
    assert np.asarray(tokens)[1, :2].tolist() == [best[1, 0], best[1, 1]]
    assert np.asarray(tokens)[2, :2].tolist() == [best[2, 0], best[2, 1]]


# --- through the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return ji.load_model("tiny")


@pytest.fixture(scope="module")
def target():
    """A small random model with the shipped models' byte vocabulary (so tiny-draft can draft for it)."""
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(7), std=0.3), ji.ByteTokenizer())


@pytest.fixture(scope="module")
def untrained_heads(target, tmp_path_factory):
    """Medusa and EAGLE heads at their initial weights: poor drafters, still lossless."""
    root = tmp_path_factory.mktemp("heads")
    heads.save_heads(root / "medusa", "medusa", heads.init_medusa(target.config, 5, jax.random.key(0)), target.config)
    heads.save_heads(root / "eagle", "eagle", heads.init_eagle(target.config, jax.random.key(1)), target.config)
    return {"medusa": str(root / "medusa"), "eagle": str(root / "eagle"), "draft": "tiny-draft"}


# Five prompts with max_batch 3, a page budget that forces preemption, two prompts sharing a prefix
# page (prefix-cache hits), a stop token and several max_tokens; page 16 keeps every block table
# in one shape bucket, so each engine compiles a handful of programs.
BASE = ji.EngineConfig(max_batch=3, page_size=16, num_pages=4)
PROMPTS = ["def fibonacci(n):\n    if n", "import os\nimport sys\n", "class Queue:\n    def", "The",
           "def fibonacci(n):\n    return"]


@pytest.fixture(scope="module")
def plain(target):
    """The requests (a stop token: the sixth token prompt 2 would generate) and the plain engine's outputs."""
    params = [dataclasses.replace(GREEDY, max_tokens=m) for m in (14, 9, 14, 3, 14)]
    stop = ji.Engine(target, BASE).generate([PROMPTS[2]], params[2])[0].token_ids[5]
    params[2] = dataclasses.replace(params[2], stop_token_ids=(stop,))
    engine = ji.Engine(target, BASE)
    outs = engine.generate(PROMPTS, params)
    assert engine.stats["preemptions"] > 0 and engine.allocator.hits > 0
    assert outs[2].finish_reason == "stop"
    return params, [(o.token_ids, o.finish_reason) for o in outs]


@pytest.mark.parametrize("method", ["ngram", "draft", "medusa", "eagle"])
def test_greedy_equals_plain_decoding(target, untrained_heads, plain, method):
    """Every method gives the plain engine's tokens and finish reasons."""
    params, expected = plain
    spec = ji.SpeculativeConfig(method=method, num_tokens=4, draft=untrained_heads.get(method))
    engine = ji.Engine(target, dataclasses.replace(BASE, speculative=spec))
    outs = engine.generate(PROMPTS, params)
    assert [(o.token_ids, o.finish_reason) for o in outs] == expected
    m = engine.metrics()
    assert m["spec_passes"] > 0 and 1.0 <= m["spec_tokens_per_pass"] <= 5.0
    assert engine.allocator.num_used == 0
    engine.allocator.check_invariants(owners={})


def test_sampling_keeps_the_target_distribution(tmp_path):
    """Thousands of sampled completions (temperature and top-p) with and without a random draft
    model that disagrees with the target: the token three places into the completion has one
    distribution; a rule that accepted every draft would not (test_the_test_rejects_a_biased_rule)."""
    cfg = ji.ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=32)
    target = ji.Model(cfg, ji.init_params(cfg, jax.random.key(1), std=0.5))
    small = dataclasses.replace(cfg, num_layers=1, layer_windows=(0,))
    ji.save_model(ji.Model(small, ji.init_params(small, jax.random.key(2), std=0.5)), tmp_path / "draft")
    n, prompt = 1000, [1, 2, 3]
    sp = [ji.SamplingParams(max_tokens=4, temperature=0.9, top_p=0.95, seed=i) for i in range(n)]
    config = ji.EngineConfig(max_batch=256, page_size=8, max_tokens_per_step=1024)
    plain = ji.Engine(target, config).generate([prompt] * n, sp)
    speculative = ji.SpeculativeConfig(method="draft", num_tokens=3, draft=str(tmp_path / "draft"))
    spec = ji.Engine(target, dataclasses.replace(config, speculative=speculative))
    drafted = spec.generate([prompt] * n, sp)
    assert spec.metrics()["spec_accepted"] > 100  # drafts were accepted and rejected both
    assert spec.metrics()["spec_accepted"] < spec.metrics()["spec_drafted"]
    a = np.array([o.token_ids[3] for o in plain])
    b = np.array([o.token_ids[3] for o in drafted])
    assert chi_square_p(a, b) > 1e-3


def test_rolled_back_cache_equals_plain_decoding(tiny):
    """After speculative steps with rejections, the K/V a sequence holds equal the plain engine's
    at the same point; pages past its end were given back."""
    prompt = tiny.tokenizer.encode("def fibonacci(n):\n    if n")
    caches = []
    for spec in (None, ji.SpeculativeConfig(method="ngram", num_tokens=4)):
        engine = ji.Engine(tiny, ji.EngineConfig(page_size=16, speculative=spec))
        rid = engine.add_request(prompt, ji.SamplingParams(max_tokens=60, temperature=0.0))
        (seq,) = engine.requests[rid].sequences
        while len(seq.generated) < 16:
            engine.step()
        if spec is not None:
            assert engine.metrics()["spec_accepted"] < engine.metrics()["spec_drafted"]  # rejections happened
            assert len(seq.pages) == seq.num_computed // 16 + 1
        n = 16 + len(prompt) - 1
        pos = np.arange(n)
        slots = np.asarray(seq.pages)[pos // 16] * 16 + pos % 16
        k = np.asarray(engine.runner.cache.k)  # (L, K, P, page, H)
        caches.append((seq.tokens[: n + 1], k.reshape(k.shape[0], k.shape[1], -1, k.shape[-1])[:, :, slots]))
    (tokens_a, kv_a), (tokens_b, kv_b) = caches
    assert tokens_a == tokens_b
    np.testing.assert_allclose(kv_b, kv_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, message", [
    (dict(method="eagle", num_tokens=0, draft="tiny-eagle"), "num_tokens=0 must be an integer >= 1"),
    (dict(method="lookahead"), "method='lookahead' is not one of"),
    (dict(method="draft"), "needs draft="),
    (dict(method="ngram", draft="tiny-draft"), "takes no draft"),
    (dict(method="synthetic"), "needs accept in \\[0, 1\\]"),
])
def test_bad_speculative_config(spec, message):
    with pytest.raises(ValueError, match=message):
        ji.SpeculativeConfig(**spec)


def test_bad_drafter_is_refused_before_anything_starts(tiny, tmp_path):
    other = ji.ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                           num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    ji.save_model(ji.Model(other, ji.init_params(other, jax.random.key(0))), tmp_path / "wide")
    for spec, message in [
        (dict(method="draft", draft=str(tmp_path / "wide")), "vocabulary of 300 tokens, the target 258"),
        (dict(method="draft", draft=str(tmp_path / "missing")), "neither a directory nor a shipped drafter"),
        (dict(method="eagle", draft=str(tmp_path / "wide")), "not a drafter directory"),
        (dict(method="eagle", draft="tiny-draft"), "is a draft drafter, not one for method='eagle'"),
    ]:
        with pytest.raises(ValueError, match=message):
            ji.Engine(tiny, ji.EngineConfig(speculative=ji.SpeculativeConfig(**spec)))


def test_spec_decode_experiment(tmp_path, capsys):
    """The experiment on the shipped drafters (a small run): JSON with tokens per pass, acceptance
    and speedups against plain decoding in the same run, a table and a plot."""
    out, png = tmp_path / "spec.json", tmp_path / "spec.png"
    run_main(spec_decode, "--methods=eagle,ngram", "--ks=2", "--num_prompts=2", "--prompt_len=12",
             "--max_tokens=10", f"--out={out}", f"--plot={png}")
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["none", "eagle", "ngram"]
    for r in rows[1:]:
        assert 1.0 <= r["tokens_per_pass"] <= 3.0 and 0 <= r["acceptance_rate"] <= 1 and r["speedup"] > 0
    assert "tok/pass" in capsys.readouterr().out and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="method='nope' is not one of"):
        run_main(spec_decode, "--methods=nope")
    with pytest.raises(ValueError, match="--ks: every value must be >= 1"):
        run_main(spec_decode, "--ks=0")


def test_spec_decode_runs_as_a_script():
    result = run_script("experiments.spec_decode", "--methods=synthetic", "--spec_accept=0.8", "--ks=3",
                        "--num_prompts=2", "--prompt_len=8", "--max_tokens=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "synthetic" in result.stdout and "speedup" in result.stdout


def test_warmup_covers_the_verify_passes(target):
    """With speculation, Engine.warmup compiles the verify passes too: serving afterwards traces
    no target program (the drafter's own compile on first use)."""
    engine = ji.Engine(target, ji.EngineConfig(max_batch=2, page_size=16,
                                               speculative=ji.SpeculativeConfig(method="ngram", num_tokens=3)))
    assert engine.warmup(max_prompt_len=12, max_len=30) > 0
    before = {k: v for k, v in runner_lib.TRACE_COUNTS.items() if k in ("step", "verify")}
    engine.generate([[1, 2, 3, 1, 2, 3, 1, 2], [5] * 12, [7, 8]], ji.SamplingParams(max_tokens=16, temperature=0.0))
    assert engine.metrics()["spec_passes"] > 0
    assert {k: v for k, v in runner_lib.TRACE_COUNTS.items() if k in ("step", "verify")} == before
