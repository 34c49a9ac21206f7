"""The quantisation experiment on the shipped model (in this process), and its JSON has what the table
needs; a bad scheme name is one clear error line when run as a user runs it."""

from __future__ import annotations

import json

import pytest

from experiments import quant_eval
from helpers import run_main, run_script


@pytest.mark.slow  # 11 s: the fast tier stays under 5 minutes on the 2-core CPU (CI runs both)
def test_quant_eval_end_to_end(tmp_path):
    out, table = tmp_path / "quant.json", tmp_path / "quant.md"
    run_main(quant_eval, "--schemes=dense,int8,int4-rtn-g32,int4-gptq-g32", "--windows=4", "--seq_len=128",
             "--calib_sequences=8", "--calib_len=64", "--decode_tokens=4", f"--out={out}", f"--table={table}")
    record = json.loads(out.read_text())
    rows = {r["scheme"]: r for r in record["results"]}
    assert record["metrics"]["int8/bits_per_byte"] == rows["int8"]["bits_per_byte"] and record["env"]["device"]
    assert list(rows) == ["dense", "int8", "int4-rtn-g32", "int4-gptq-g32"]
    assert rows["dense"]["greedy_agreement"] == 1.0 and rows["dense"]["bits_per_byte_change"] == 0.0
    # Bytes: int8 about a quarter of float32 projections, int4 about an eighth (plus scales).
    dense_bytes = rows["dense"]["projection_bytes"]
    assert 0.25 < rows["int8"]["projection_bytes"] / dense_bytes < 0.27
    assert 0.125 < rows["int4-rtn-g32"]["projection_bytes"] / dense_bytes < 0.17
    assert abs(rows["int8"]["bits_per_byte_change"]) < 0.005
    assert 0.5 < rows["int4-gptq-g32"]["greedy_agreement"] < 1.0 and rows["int8"]["decode_tok_s"] > 0
    assert "| int4-gptq-g32 |" in table.read_text()


def test_bad_scheme_fails_before_any_work():
    with pytest.raises(ValueError, match="weights='int5'"):
        run_main(quant_eval, "--schemes=dense,int5")


def test_bad_scheme_is_one_error_line():
    bad = run_script("experiments.quant_eval", "--schemes=dense,int5", timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --schemes: weights='int5'")


@pytest.mark.slow  # the experiment's plumbing is test_quant_eval_end_to_end's; the schemes: test_w8a8, test_simulated
def test_quant_eval_w8a8_and_simulated_schemes(tmp_path):
    """The W8A8 and simulated schemes through the experiment (no decode timing): canonical W8A8 names
    (the flag's alpha where the name gives none), nominal bytes for a simulated format, and the
    record says which FP8 GEMM ran."""
    out = tmp_path / "quant.json"
    run_main(quant_eval, "--schemes=dense,w8a8-smooth,fp8-static,nvfp4-sim", "--smooth_alpha=0.7", "--windows=2",
             "--seq_len=64", "--calib_sequences=4", "--calib_len=32", "--decode_tokens=0", f"--out={out}")
    record = json.loads(out.read_text())
    rows = {r["scheme"]: r for r in record["results"]}
    assert list(rows) == ["dense", "w8a8-int8-smooth-a0.7", "w8a8-fp8-static", "nvfp4-sim"]
    dense_bytes = rows["dense"]["projection_bytes"]
    assert 0.25 < rows["w8a8-int8-smooth-a0.7"]["projection_bytes"] / dense_bytes < 0.26  # int8 + float32 scales
    assert rows["nvfp4-sim"]["bytes_nominal"] and rows["nvfp4-sim"]["projection_bytes"] / dense_bytes < 0.15
    assert not rows["w8a8-fp8-static"]["bytes_nominal"] and abs(rows["w8a8-fp8-static"]["bits_per_byte_change"]) < 0.01
    assert record["fp8_gemm"] == ("quality: xla reference (float8_e4m3fn values cast to float32); "
                                  "decode: xla reference (float8_e4m3fn values cast to float32)")  # auto on a CPU
    with pytest.raises(ValueError, match="--smooth_alpha=2.0"):
        run_main(quant_eval, "--schemes=dense,w8a8-smooth", "--smooth_alpha=2")
