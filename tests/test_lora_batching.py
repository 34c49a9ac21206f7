"""The multi-LoRA batching experiment on the shipped model (in this process, a small workload): its
JSON has what the table and the plot need, adapters beyond the slots are swapped and counted; one
run as a user runs it; bad flags are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import lora_batching
from helpers import run_main, run_script

SMALL = ["--num_requests=4", "--prompt_len=8", "--output_len=3", "--runs=1", "--max_adapters=2"]


def test_swaps_are_counted_and_the_record_is_complete(tmp_path, capsys):
    out, png = tmp_path / "lora.json", tmp_path / "lora.png"
    run_main(lora_batching, *SMALL, "--adapters=3", "--composition=distinct", "--ranks=4",
             "--targets=q_proj,down_proj", f"--adapter_dir={tmp_path}", f"--out={out}", f"--plot={png}")
    record = json.loads(out.read_text())
    assert record["config"]["max_adapters"] == 2 and record["environment"]["jax_version"]
    assert record["projections"] == ["wq", "w_down"]
    rows = {(r["adapters"], r["composition"]): r for r in record["results"]}
    assert set(rows) == {(3, "distinct")}
    for r in rows.values():
        assert r["tok_s"] > 0 and r["base_tok_s"] > 0 and r["ratio"] == r["tok_s"] / r["base_tok_s"]  # one run pair
        assert r["slots"] == 2 and r["rank"] == 4 and r["adapter_device_bytes"] > 0 and r["compile_s"] > 0
    assert rows[3, "distinct"]["distinct_in_batch"] == 3 and rows[3, "distinct"]["evictions_per_run"] > 0 and rows[3, "distinct"]["swap_s_per_run"] > 0
    assert (tmp_path / "r4-2" / "adapter_model.safetensors").exists()  # PEFT's layout, kept in --adapter_dir
    assert png.stat().st_size > 1000
    table = capsys.readouterr().out
    assert "evict/run" in table and "vs base" in table


def test_compositions():
    rng = np.random.default_rng(0)
    assert lora_batching.compose("distinct", 3, 7, rng) == [0, 1, 2, 0, 1, 2, 0]
    uniform = lora_batching.compose("uniform", 4, 4000, rng)
    assert set(uniform) == {0, 1, 2, 3} and max(np.bincount(uniform)) < 1100
    zipf = np.bincount(lora_batching.compose("zipf", 8, 4000, rng, zipf_a=1.5), minlength=8)
    assert zipf[0] > 2 * zipf[1] > 0 and list(zipf) == sorted(zipf, reverse=True)


@pytest.mark.slow  # 4 s: a script run; the fast tier keeps the experiment's functions
def test_runs_as_a_script(tmp_path):
    out = tmp_path / "smoke.json"
    result = run_script("experiments.lora_batching", "--adapters=1", "--composition=distinct", "--num_requests=1",
                        "--prompt_len=2", "--output_len=1", "--runs=1", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base tok/s" in result.stdout and "compiled and served once" in result.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["slots"] == 1 and row["loads_per_run"] == 0  # one slot each: loaded once, while warming up


@pytest.mark.parametrize("flags, message", [
    (["--adapters=0"], "--adapters=0: every value must be >= 1"),
    (["--adapters=a,b"], "--adapters=a,b: not a list of integers"),
    (["--ranks=32"], "--ranks=32 has a rank over --max_lora_rank=16"),
    (["--composition=sorted"], "--composition: 'sorted' is not one of uniform, zipf, distinct"),
    (["--targets=embed_tokens"], "--targets: 'embed_tokens' is not all-linear or one of q_proj"),
    (["--num_requests=0"], "--num_requests=0 must be >= 1"),
    (["--zipf_a=0"], "--zipf_a=0.0 must be > 0"),
])
def test_bad_flags_are_refused_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        run_main(lora_batching, *flags)
