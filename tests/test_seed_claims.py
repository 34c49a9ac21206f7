"""The seed-claims report: every claim of the note gets a row with the figure, a verdict and its
source; verdicts follow the figures (given rows here, so no experiment runs in these tests but the
slow one, which runs a small sweep from another directory)."""

from __future__ import annotations

import json

import pytest
from absl.testing import flagsaver

from experiments import seed_claims
from helpers import REPO, run_main

ROWS = {
    "batching": [
        {"batching": "continuous", "kv_layout": "paged", "throughput_tok_s": 300.0, "kv_waste": 0.03},
        {"batching": "static", "kv_layout": "contiguous", "throughput_tok_s": 100.0, "kv_waste": 0.55},
        {"batching": "static", "kv_layout": "paged", "throughput_tok_s": 150.0, "kv_waste": 0.05},
    ],
    "quant": [{"scheme": "dense", "bits_per_byte_change": 0.0}, {"scheme": "int8", "bits_per_byte_change": 0.0001},
              {"scheme": "int4-awq-g32", "bits_per_byte_change": 0.012},
              {"scheme": "int4-rtn-g32", "bits_per_byte_change": 0.031}],
    "spec": [{"method": "none", "k": 0, "temperature": 0, "speedup": 1.0},
             {"method": "eagle", "k": 3, "temperature": 0, "speedup": 1.6, "tokens_per_pass": 3.1},
             {"method": "eagle", "k": 5, "temperature": 0, "speedup": 1.9, "tokens_per_pass": 4.3}],
    "lora": [{"adapters": 1, "rank": 16, "ratio": 0.95, "adapter_device_bytes": 2**20, "adapter_host_bytes": 2**14,
              "slots": 1},
             {"adapters": 64, "rank": 16, "ratio": 0.84, "adapter_device_bytes": 2**23, "adapter_host_bytes": 2**20,
              "slots": 64}],
}


def test_every_claim_gets_a_row_and_a_verdict(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(seed_claims, "run_sweep", lambda name, out: ran.append(name) or ROWS[name])
    report = tmp_path / "claims.md"
    run_main(seed_claims, f"--report={report}", f"--runs_dir={tmp_path}")
    text = report.read_text()
    assert sorted(ran) == sorted(ROWS)  # each run once, however many claims read it
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(seed_claims.CLAIMS)
    by_claim = dict(zip((c.name for c in seed_claims.CLAIMS), rows))
    assert "2,147,483,648 bytes" in by_claim["kv_formula"] and "**holds**" in by_claim["kv_formula"]
    assert "8.0x fewer" in by_claim["gqa"]
    assert "contiguous 55%, paged 3%" in by_claim["kv_waste"] and "**holds**" in by_claim["kv_waste"]
    assert "3.00x the throughput" in by_claim["continuous"] and "**holds**" in by_claim["continuous"]
    assert "int8 +0.01%" in by_claim["quant_accuracy"] and "+3.10% (int4-rtn-g32)" in by_claim["quant_accuracy"]
    # the recorded SmolLM2 task figures (benchmarks/results/eval_quant_smollm2.json)
    assert "int4-rtn-g128 -3.5 ± 1.3" in by_claim["quant_accuracy"] and "fp8 KV +0.5 ± 0.5" in by_claim["quant_accuracy"]
    assert "1.60-1.90x" in by_claim["speculative"] and "**holds in part**" in by_claim["speculative"]
    assert "0.84x" in by_claim["multi_lora"] and "**holds**" in by_claim["multi_lora"]


def test_a_failed_run_is_said_not_hidden(tmp_path, monkeypatch):
    monkeypatch.setattr(seed_claims, "run_sweep", lambda name, out: [])
    report = tmp_path / "claims.md"
    run_main(seed_claims, f"--report={report}", f"--runs_dir={tmp_path}", "--only=continuous,gqa")
    text = report.read_text()
    assert "**not measured here** | the batching run failed" in text and "8.0x fewer" in text


def test_unknown_claim_is_refused():
    with pytest.raises(ValueError, match="--only: 'speed' is not a claim"):
        run_main(seed_claims, "--only=speed")


@pytest.mark.slow
def test_a_run_sweeps_from_another_directory_and_a_failed_point_is_named(tmp_path, monkeypatch):
    """run_sweep from a working directory that is not the checkout, with a relative --runs_dir: the
    grid is written there, the sweep and its points run there; a failed point's error line reaches
    the verdict."""
    monkeypatch.setitem(seed_claims.RUNS, "probe", seed_claims.Run(
        "kv_capacity", {"models": "llama3_8b", "cards": "h100_80gb"}, {}, ({"context": 2048}, {"kv_dtype": "int3"})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", REPO)  # the checkout's experiments package, as from its root
    with flagsaver.flagsaver():
        seed_claims.FLAGS(["seed_claims", "--timeout_s=300"])
        assert seed_claims.run_sweep("probe", "runs") == []  # a run with a failed point gives no rows
    rows = [json.loads(line) for line in (tmp_path / "runs" / "probe" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["failed", "ok"]
    why = seed_claims.failure("probe", "runs")
    assert "the probe run failed (1 failed; the first: exit status 2: error: kv_dtype='int3'" in why
