"""Drafter training data and its report: self-distilled windows reused for other fused layers
(experiments._distill), and the scaling table's join and fit (experiments.drafter_scaling)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from absl.testing import flagsaver
from helpers import run_main

from experiments import _distill, drafter_scaling, train_drafter


def test_windows_made_for_one_method_are_reused_for_fused_layers(tiny, tmp_path, monkeypatch):
    """EAGLE's cached windows serve an EAGLE-3 run fusing layers (0, 1, 2): nothing is generated
    again, and the views are the target's own on those windows."""
    windows = np.random.default_rng(0).integers(0, tiny.config.vocab_size, (3, 16)).astype(np.int32)
    np.savez(tmp_path / "tiny-distill-3x16-p6-t0-s0.npz", tokens=windows, generate_seconds=np.float64(1.5),
             features=np.zeros((3, 16, tiny.config.hidden_size), np.float16))  # as EAGLE's run leaves it
    monkeypatch.setattr(_distill, "self_distilled", lambda *args: pytest.fail("windows generated again"))
    with flagsaver.flagsaver():
        _distill.FLAGS(["test", "--self_distill=3", "--distill_prompt_len=6", "--seq_len=16"])
        fused = _distill.distilled_data(tiny, str(tmp_path), (0, 1, 2))
        again = _distill.distilled_data(tiny, str(tmp_path), (0, 1, 2))  # now from its own cache file
        other = tmp_path / "other"  # another seed's windows (-s01 is not -s0's) are not these
        other.mkdir()
        os.replace(tmp_path / "tiny-distill-3x16-p6-t0-s0.npz", other / "tiny-distill-3x16-p6-t0-s01.npz")
        with pytest.raises(pytest.fail.Exception, match="windows generated again"):
            _distill.distilled_data(tiny, str(other), (0, 1, 2))
    np.testing.assert_array_equal(fused["tokens"], windows)
    assert float(fused["generate_seconds"]) == 1.5
    features, aux, nxt = _distill._target_inputs(tiny.params, tiny.config, windows, (0, 1, 2))
    np.testing.assert_array_equal(fused["aux"], np.asarray(aux, np.float16))
    np.testing.assert_array_equal(fused["features"], np.asarray(features, np.float16))
    np.testing.assert_array_equal(fused["target_next"], nxt)
    assert fused["aux"].shape == (3, 16, 3 * tiny.config.hidden_size)
    np.testing.assert_array_equal(again["aux"], fused["aux"])
    assert len(list(tmp_path.glob("*-aux0_1_2.npz"))) == 1


def test_fused_layers_past_the_target_are_refused_before_any_data(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(_distill, "self_distilled", lambda *args: pytest.fail("windows generated"))
    with pytest.raises(ValueError, match=r"--aux_layers=0,1,3: layer 3 is past the target's 3 layers \(0..2\)"):
        run_main(train_drafter, "--method=eagle3", "--aux_layers=0,1,3", "--self_distill=2", f"--ckpt_dir={tmp_path}",
                 f"--out_dir={tmp_path / 'out'}")


def _training(path, out_dir, tokens, steps, first):
    path.write_text(json.dumps({"method": "eagle3", "aux_layers": [2, 15, 27], "distill_tokens": tokens, "steps": steps, "batch": 8, "seq_len": 256,
                                "heldout_agreement": [first, first / 2],
                                "command": f"python -m x --method=eagle3 --out_dir={out_dir}"}))


def test_scaling_joins_measurements_to_their_heads_and_fits_per_decade(tmp_path):
    """Rows join spec_decode's measurement to the head's training record through its folder; the
    fit takes the best-trained head of each data size, and solves for the levels."""
    _training(tmp_path / "a_training.json", "/runs/a", 100_000, 400, 0.2)
    _training(tmp_path / "b_training.json", "/runs/b", 1_000_000, 500, 0.3)
    _training(tmp_path / "b1_training.json", "/runs/b1", 1_000_000, 100, 0.25)  # fewer steps: not in the fit
    results = [{"method": "none", "k": 0, "temperature": 0.0, "batch": 1},
               {"method": "eagle3:/runs/a", "k": 5, "temperature": 0.0, "batch": 1, "tokens_per_pass": 1.5, "speedup": 1.2},
               {"method": "eagle3:/runs/b/", "k": 5, "temperature": 0.0, "batch": 1, "tokens_per_pass": 2.0},
               {"method": "eagle3:/runs/b1", "k": 5, "temperature": 0.0, "batch": 1, "tokens_per_pass": 1.1},
               {"method": "eagle3_tree:/runs/b", "k": 5, "temperature": 0.0, "batch": 1, "tokens_per_pass": 2.2},
               {"method": "eagle3:/runs/b", "k": 4, "temperature": 0.0, "batch": 1, "tokens_per_pass": 9.0},
               {"method": "eagle3:/runs/b", "k": 5, "temperature": 1.0, "batch": 1, "tokens_per_pass": 9.0},
               {"method": "eagle3:/runs/unknown", "k": 5, "temperature": 0.0, "batch": 1, "tokens_per_pass": 9.0}]
    (tmp_path / "spec.json").write_text(json.dumps({"config": {}, "results": results}))
    (tmp_path / "other.json").write_text("[1, 2]")
    out = tmp_path / "report" / "scaling.json"
    out.parent.mkdir()
    run_main(drafter_scaling, f"--dir={tmp_path}", f"--out={out}", "--levels=2.5,4")
    record = json.loads(out.read_text())
    chain = sorted((r["data_tokens"], r["steps"], r["tokens_per_pass"], r["epochs"]) for r in record["rows"]
                   if r["shape"] == "chain")
    assert chain == [(100_000, 400, 1.5, 8.19), (1_000_000, 100, 1.1, 0.2), (1_000_000, 500, 2.0, 1.02)]
    (fit,) = record["fits"]  # the tree has one data size: no line
    assert (fit["method"], fit["shape"], fit["points"]) == ("eagle3 2,15,27", "chain", 2)
    assert fit["per_decade"] == pytest.approx(0.5) and fit["tokens_to_reach"]["2.5"] == pytest.approx(1e7)
    assert fit["tokens_to_reach"]["4"] == pytest.approx(1e10)
