"""experiments.eval_tasks (task accuracy under an engine configuration, paired against a baseline)
and the task data shipped in configs/tasks/: the paired statistics against hand-worked values, the
shipped cloze file against its generator and the documentation it quotes, the task YAMLs as lm-eval
builds them, and the experiment end to end on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'jaxinfer[eval]'")

from helpers import REPO
from lm_eval.tasks import TaskManager

import jaxinfer.evaluation as ev
from experiments import eval_tasks
from jaxinfer.evaluation import tasks


def _sample(doc_id, target, lls, acc):
    return {"doc_id": doc_id, "target": target, "loglikelihoods": lls, "metrics": {"acc": acc}}


def test_paired_differences_equal_hand_worked_values():
    base = [_sample(0, 1, [-3.0, -1.0, -2.0], 1.0), _sample(1, 0, [-1.0, -2.0, -4.0], 1.0),
            _sample(2, 2, [-1.0, -2.0, -3.0], 0.0), _sample(9, 0, [-1.0, -1.5, -2.0], 1.0)]
    mine = [_sample(2, 2, [-1.5, -2.0, -1.0], 1.0), _sample(1, 0, [-1.0, -0.5, -4.0], 0.0),
            _sample(0, 1, [-3.0, -1.5, -2.0], 1.0)]  # doc 9 is the baseline's only
    got = eval_tasks.paired(mine, base)
    d = np.array([0.0, -1.0, 1.0])  # acc differences of docs 0, 1, 2
    assert got["paired_docs"] == 3
    assert got["acc_diff"] == pytest.approx(0.0)
    assert got["acc_diff_stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert got["ll_shift"] == pytest.approx(np.mean([-0.5, 0.0, 2.0]))  # each right choice's change
    assert got["ll_abs_shift"] == pytest.approx(np.mean([0, 0.5, 0, 0, 1.5, 0, 0.5, 0, 2.0]))
    assert got["same_answer"] == pytest.approx(1 / 3)  # doc 0 keeps choice 1; docs 1, 2 change
    with pytest.raises(ValueError, match="none of this run's documents"):
        eval_tasks.paired(mine, [_sample(7, 0, [-1.0], 1.0)])


def test_samples_keep_what_a_paired_comparison_needs():
    logged = [{"doc_id": 3, "target": 1, "resps": [[(-2.5, False)], [(-0.5, True)]], "metrics": ["acc", "acc_norm"],
               "acc": 1.0, "acc_norm": 0.0},
              {"doc_id": 1, "target": "12", "resps": [["12 is"]], "metrics": ["exact_match"], "exact_match": 1.0}]
    rows = eval_tasks.samples_of(logged)
    assert [r["doc_id"] for r in rows] == [1, 3]
    assert rows[1] == {"doc_id": 3, "target": 1, "metrics": {"acc": 1.0, "acc_norm": 0.0},
                       "loglikelihoods": [-2.5, -0.5]}
    assert rows[0] == {"doc_id": 1, "target": "12", "metrics": {"exact_match": 1.0}}


def _shipped_cloze():
    with open(os.path.join(ev.TASKS_DIR, "pydoc_cloze.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_shipped_cloze_questions_quote_the_documentation():
    """Each context opens a prose paragraph of pydoc_data.topics and the right ending is its next
    8 words; the other endings are 8 words of the documentation too, all four different."""
    from pydoc_data import topics

    questions = _shipped_cloze()
    assert len(questions) == 400
    for q in questions:
        assert len(set(q["endings"])) == 4 and all(len(e.split()) == tasks.CLOZE_ENDING_WORDS for e in q["endings"])
        words = " ".join(topics.topics[q["topic"]].split())
        assert f"{q['context']} {q['endings'][q['label']]}" in words, q["context"]
        assert tasks.CLOZE_CONTEXT_WORDS[0] <= len(q["context"].split()) <= tasks.CLOZE_CONTEXT_WORDS[1]
    labels = np.bincount([q["label"] for q in questions], minlength=4)
    assert labels.min() > 70  # shuffled: no position carries the answer


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the file was drawn from Python 3.11's documentation")
def test_shipped_cloze_file_is_what_its_generator_draws():
    assert tasks.pydoc_cloze(400) == _shipped_cloze()


@pytest.mark.parametrize("task, kind, count", [("jaxinfer_pydoc_cloze", "loglikelihood", 1600),
                                               ("jaxinfer_arith_gen", "generate_until", 40)])
def test_shipped_tasks_build_their_requests(task, kind, count):
    manager = TaskManager(include_path=ev.TASKS_DIR, include_defaults=False)  # ours only: no index of lm-eval's
    built = manager.load([task])["tasks"][task]
    built.build_all_requests(rank=0, world_size=1)
    assert [r.request_type for r in built.instances] == [kind] * count


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "experiments.eval_tasks", "--model=tiny", "--tasks=jaxinfer_arith_mc",
           "--limit=12", "--windows=2", "--seq_len=64", f"--out={out}", *args]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_eval_tasks_end_to_end_with_a_baseline(tmp_path):
    """The dense run, then int8 weights and KV paired against it; the dense run paired against
    itself changes nothing."""
    dense = _run(tmp_path, "dense")
    m = dense["metrics"]
    assert dense["config"]["quant"] == "dense" and len(dense["samples"]["jaxinfer_arith_mc"]) == 12
    assert m["jaxinfer_arith_mc/acc"] == pytest.approx(np.mean(
        [s["metrics"]["acc"] for s in dense["samples"]["jaxinfer_arith_mc"]]))
    assert 0 < m["jaxinfer_arith_mc/acc_stderr"] and 0 < m["bits_per_byte"] < 8 and m["prefill_tok_s"] > 0
    same = _run(tmp_path, "same", f"--paired_with={tmp_path / 'dense.json'}")["metrics"]
    assert same["jaxinfer_arith_mc/acc_diff"] == 0 and same["jaxinfer_arith_mc/same_answer"] == 1
    assert abs(same["jaxinfer_arith_mc/ll_abs_shift"]) < 1e-4
    q = _run(tmp_path, "int8", "--quant=int8", "--kv_dtype=int8", f"--paired_with={tmp_path / 'dense.json'}")
    assert q["model_args"]["quant"] == "int8" and q["model_args"]["kv_dtype"] == "int8"
    assert 0 < q["metrics"]["jaxinfer_arith_mc/ll_abs_shift"] < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--quant=int5"], "--quant="),
    (["--tasks=no_such_task"], "--tasks: no_such_task is not a task"),
    (["--limit=-1"], "--limit=-1 must be >= 0"),
    (["--paired_with=/no/such.json"], "--paired_with=/no/such.json: no such file"),
    (["--kv_dtype=int3"], "kv_dtype"),
])
def test_bad_flags_end_in_one_error_line(args, words):
    run = subprocess.run([sys.executable, "-m", "experiments.eval_tasks", "--model=tiny", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and words in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
