"""The GPU session's report: every JSON under the session's folder becomes a section with its card
and date, and the GPU issue's ratios are computed from the runs that measure them."""

from __future__ import annotations

import json

import pytest

from experiments import gpu_report
from helpers import run_main


def _record(command, metrics, results=()):
    env = {"device": "NVIDIA H100 80GB HBM3", "jax_version": "0.11.2", "date": "2026-11-27", "command": command}
    return {"config": {}, "env": env, "metrics": metrics, "results": list(results)}


def test_report_has_every_run_and_the_targets(tmp_path):
    runs = {
        "skewed_continuous": _record("bench_batching --batching=continuous", {"throughput_tok_s": 900.0}),
        "skewed_static": _record("bench_batching --batching=static", {"throughput_tok_s": 400.0}),
        "overhead_overlap-true": _record("bench_batching --overlap", {"engine_tpot_s": 0.0105, "bare_step_s": 0.01}),
        "kernels": {"device": "NVIDIA H100 80GB HBM3", "jax_version": "0.11.2", "date": "2026-11-27",
                    "command": "bench_kernels", "results": [{"section": "decode", "variant": "ours", "GB/s": 2205.0}]},
    }
    for name, record in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    out = tmp_path / "report.md"
    run_main(gpu_report, f"--dir={tmp_path}", f"--out={out}")
    text = out.read_text()
    assert "# GPU session on NVIDIA H100 80GB HBM3" in text
    assert "| continuous / static throughput, skewed outputs | 2.25x | >= 2x |" in text
    assert "| engine TPOT / bare jitted step, batch 1, overlap on | 1.05x | <= 1.10x |" in text
    assert "overlap off" not in text  # not measured in this session: no row
    for name in runs:
        assert f"## {name}\n" in text
    assert "| decode | ours | 2,205 |" in text and "jax 0.11.2, 2026-11-27" in text


def test_bad_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no JSON files"):
        run_main(gpu_report, f"--dir={tmp_path}")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        run_main(gpu_report, f"--dir={tmp_path}")


def test_steps_table_and_rehearsal_mark(tmp_path):
    """steps.tsv (the script's own log) becomes the steps table with failures marked; a rehearsal's
    page says in its title and first line that its figures are not measurements."""
    (tmp_path / "kernels.json").write_text(json.dumps({"device": "cpu", "jax_version": "0.10.2", "date": "2026-12-05",
                                                       "command": "bench_kernels --quick", "results": []}))
    (tmp_path / "steps.tsv").write_text("# mode\trehearsal\nstep\tlimit_s\texit\tseconds\tjson\n"
                                        "-\t31\t0\t20\t-\nkernels\t40\t0\t12\tkernels.json\n"
                                        "lora_64\t27\t124\t27\tlora_64.json\nsampler\t6\t1\t3\tsampler.json\n")
    out = tmp_path / "report.md"
    run_main(gpu_report, f"--dir={tmp_path}", f"--out={out}")
    text = out.read_text()
    assert text.startswith("# GPU session rehearsal on cpu\n") and "its figures are not measurements" in text
    assert "| tests | 31 | 0 | 20 |" in text and "| kernels | 40 | 0 | 12 |" in text
    assert "| lora_64 | 27 | 124 (over its limit) | 27 |" in text and "| sampler | 6 | 1 (failed) | 3 |" in text
    assert "4 steps, 2 failed, 62 s in all." in text
    (tmp_path / "steps.tsv").write_text("# mode\tdevice\nstep\tlimit_s\texit\tseconds\tjson\nkernels\t90\t0\t50\tk\n")
    run_main(gpu_report, f"--dir={tmp_path}", f"--out={out}")
    assert out.read_text().startswith("# GPU session on cpu\n") and "not measurements" not in out.read_text()


def test_ratio_targets_read_metrics_and_rows(tmp_path):
    """A figure that is already a ratio: from flat metrics (spec_decode) or the first row (lora_batching)."""
    (tmp_path / "spec_synthetic.json").write_text(json.dumps(
        _record("spec_decode --methods=synthetic", {"synthetic/k=5/T=0/b=1/speedup": 2.75})))
    (tmp_path / "lora_64.json").write_text(json.dumps({"environment": _record("lora_batching", {})["env"],
                                                        "results": [{"adapters": 64, "ratio": 0.83}]}))
    out = tmp_path / "report.md"
    run_main(gpu_report, f"--dir={tmp_path}", f"--out={out}")
    text = out.read_text()
    assert "| speculative (synthetic, acceptance 0.8, k=5) / plain decode, TPOT speed-up | 2.75x | >= 2.5x |" in text
    assert "| 64 distinct LoRA adapters r16, batch 64 / base model, throughput | 0.83x | >= 0.8x |" in text
    assert "## lora_64\n\nNVIDIA H100 80GB HBM3, jax 0.11.2, 2026-11-27" in text  # its `environment` read
