"""The batching experiment on the shipped model (in this process, small workloads): its JSON has
what the table needs, the measured run compiles nothing after the warm-up, and continuous
batching takes fewer steps and wastes less KV than static batching; one run as a user runs it."""

from __future__ import annotations

import json

import jax
import pytest

from experiments import bench_batching
from helpers import run_main, run_script

SKEWED = ["--num_requests=10", "--max_batch=3", "--prompt_dist=fixed", "--prompt_len=8",
          "--output_dist=lognormal", "--output_len=16", "--sigma=1.2", "--max_len=40", "--max_tokens_per_step=32"]


def _bench(tmp_path, name, *flags):
    out = tmp_path / f"{name}.json"
    run_main(bench_batching, f"--out={out}", *flags)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return {
        "continuous": _bench(tmp, "continuous", *SKEWED, "--batching=continuous"),
        "static": _bench(tmp, "static", *SKEWED, "--batching=static", "--kv_layout=contiguous"),
    }


def test_result_has_every_field(runs, capsys):
    record = runs["continuous"]
    assert record["config"]["batching"] == "continuous" and record["env"]["jax_version"]
    expected = "pallas" if jax.default_backend() == "gpu" else "xla"  # "auto" resolved: which path ran
    assert record["config"]["attention"] == "auto" and record["env"]["implementations"]["attention"] == expected
    assert record["metrics"]["throughput_tok_s"] > 0 and record["metrics"]["ttft_s/p50"] >= 0
    (r,) = record["results"]
    for key in ("throughput_tok_s", "ttft_s", "tpot_s", "latency_s", "kv_waste", "host_share", "preemptions"):
        assert key in r
    assert r["lookahead_calls"] > 0 and 0.0 <= r["device_idle_share"] < 1.0  # overlap is on by default
    for key in ("mean", "p50", "p90", "p99"):
        assert r["ttft_s"][key] >= 0 and r["tpot_s"][key] > 0
    assert len(r["requests"]) == 10
    assert all(q["generated_tokens"] == q["output_len"] for q in r["requests"])


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_the_warmup_leaves_nothing_to_compile(runs, policy):
    (r,) = runs[policy]["results"]
    assert r["warmup_compiled"] > 0 and r["compiles_during_run"] == 0


def test_continuous_takes_fewer_steps_and_wastes_less_kv(runs):
    """Loose guards against regressions (not speed: that is measured in benchmarks/results/batching.md)."""
    (c,) = runs["continuous"]["results"]
    (s,) = runs["static"]["results"]
    assert c["steps"] < s["steps"]  # slots refilled: fewer iterations for the same tokens
    assert c["kv_waste"] < s["kv_waste"]


@pytest.mark.slow  # 2.4 s: the sweep and plot; the runs fixture keeps the bench itself fast
def test_poisson_sweep_and_plot(tmp_path):
    png = tmp_path / "latency.png"
    record = _bench(tmp_path, "poisson", "--num_requests=4", "--arrival=poisson", "--rates=40,80", "--max_batch=2",
                    "--output_len=6", "--prompt_len=8", "--max_len=16", f"--plot={png}")
    assert [r["rate"] for r in record["results"]] == [40.0, 80.0]
    assert all(r["compiles_during_run"] == 0 for r in record["results"])
    assert png.stat().st_size > 1000


def test_random_model_shaped_like_a_config(tmp_path, capsys):
    """random:<config> builds random weights of a config's shape (the GPU run uses random:llama3_8b),
    and --step_overhead times batch-1 decode through the engine against the bare step."""
    cfg = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    record = _bench(tmp_path, "random", f"--model=random:{path}", "--step_overhead=8", "--dtype=bfloat16")
    m = record["metrics"]
    assert m["tokens"] == 8 and m["engine_tpot_s"] > 0 and m["bare_step_s"] > 0
    assert 0.0 <= m["device_idle_share"] < 1.0
    assert "random:" in capsys.readouterr().out


@pytest.mark.slow  # 3 s: a subprocess; the module's other tests run main in process
def test_runs_as_a_script(tmp_path):
    out = tmp_path / "smoke.json"
    result = run_script("experiments.bench_batching", "--num_requests=3", "--max_batch=2", "--prompt_len=8",
                        "--output_len=4", "--max_len=12", "--warmup=replay", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TTFT" in result.stdout and "KV waste" in result.stdout and "dev idle" in result.stdout
    assert json.loads(out.read_text())["results"][0]["compiles_during_run"] == 0


@pytest.mark.parametrize("flags, message", [
    (["--num_requests=0"], "--num_requests=0 must be >= 1"),
    (["--num_requests=-3"], "--num_requests=-3 must be >= 1"),
    (["--arrival=poisson", "--rates=abc"], "--rates: 'abc' is not a number"),
    (["--rates=4,8"], "--rates applies to --arrival=poisson only"),
])
def test_bad_flags_are_refused_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        run_main(bench_batching, *flags)
