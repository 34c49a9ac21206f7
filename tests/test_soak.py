"""experiments.soak: randomised requests under a tight KV budget keep every invariant (no crash,
no leaked page, every bad request refused with its error, greedy outputs equal to the same
request served alone), on the shipped tiny model and on the mock runner, both with adapters and
speculation; and the soak does report a violation when one is planted. Deadlines are counted in
engine steps, so no assertion depends on the machine's speed."""

from __future__ import annotations

import numpy as np
import pytest
from absl.testing import flagsaver
from helpers import run_main

from experiments import soak
from jaxinfer.engine import scheduler as scheduler_lib
from jaxinfer.engine.mock_runner import MockRunner

# Small shapes: few programs to compile (chunks of 16, block tables of 4 pages, at most 4 rows).
SMALL = ("--max_batch=4", "--max_tokens_per_step=16", "--page_size=8", "--max_prompt_len=20", "--max_output_len=12",
         "--nocompile_first")


def run_soak(*argv: str) -> dict:
    with flagsaver.flagsaver():
        soak.FLAGS(["soak", *argv])
        return soak.run_soak()


@pytest.mark.slow  # 14 s; the slow tier also runs the 10,000-request soak
def test_soak_on_the_tiny_model():
    """The suite's real-model soak: 150 requests on the path of the 10,000-request one (LoRA adapters
    on fewer slots, prompt-lookup speculation, an int8 KV cache); every greedy one checked against
    serving it alone."""
    rec = run_soak("--requests=150", "--seed=3", "--bad_rate=0.1", "--abort_rate=0.08", "--deadline_rate=0.08",
                   "--deadline_steps=8", "--num_adapters=2", "--max_adapters=1", "--spec=ngram", "--spec_tokens=3",
                   "--kv_dtype=int8", *SMALL)
    r = rec["summary"]
    assert rec["violations"] == [] and r["violations"] == 0
    assert r["pages_leaked"] == 0 and r["free_pages_end"] == r["free_pages_start"] == r["num_pages"]
    assert r["checked_alone"] >= 50 and r["preemptions"] > 0 and r["aborts"] > 0 and r["bad_requests"] >= 8
    assert r["lora_loads"] > 1 and r["spec_acceptance_rate"] > 0
    assert r["good_requests"] + r["bad_requests"] == 150


def test_soak_on_the_mock_with_adapters_and_speculation():
    """500 requests on the mock runner (exact outputs): LoRA adapters on fewer slots than adapters,
    prompt-lookup speculation, deadlines that do expire, every kind of bad input."""
    rec = run_soak("--runner=mock", "--requests=500", "--seed=4", "--num_adapters=3", "--max_adapters=2",
                   "--spec=ngram", "--spec_tokens=3", "--bad_rate=0.15", "--deadline_rate=0.1", "--deadline_steps=4",
                   *SMALL)
    r = rec["summary"]
    assert rec["violations"] == []
    assert set(r["bad_by_kind"]) == set(soak.BAD_KINDS)
    assert r["finish_reasons"].get("timeout", 0) > 0 and r["finish_reasons"].get("aborted", 0) > 0
    assert r["lora_loads"] > 2 and r["spec_acceptance_rate"] > 0 and r["preemptions"] > 0
    assert r["checked_alone"] > 100 and r["near_ties"] == 0


class CorruptingRunner(MockRunner):
    """The first one made (the soak's engine; the alone runs get the next) serves every third token wrong."""

    made = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.corrupt, CorruptingRunner.made = CorruptingRunner.made == 0, CorruptingRunner.made + 1

    def _mixed(self, plan):
        out = super()._mixed(plan)
        for row in out.rows:
            if self.corrupt and row.tokens and len(row.seq.generated) == 2:
                row.tokens[0] = (row.tokens[0] + 1) % self.vocab_size
        return out


@pytest.mark.parametrize("fault", ["wrong_token", "leak", "accepts_bad"])
def test_soak_reports_a_planted_fault(fault, monkeypatch, capsys):
    argv = ["--runner=mock", "--requests=120", "--seed=5", "--overlap=false", "--bad_rate=0.2", "--abort_rate=0.2", *SMALL]
    if fault == "wrong_token":
        monkeypatch.setattr(soak, "MockRunner", CorruptingRunner)
        monkeypatch.setattr(CorruptingRunner, "made", 0)
        argv.append("--abort_rate=0")
        words = "differ at 2 from the same request served alone"
    elif fault == "leak":
        finish = scheduler_lib.Scheduler.finish

        def leaky(self, seq, reason):
            if reason == "aborted":
                seq.pages = []  # forgets its pages instead of freeing them
            finish(self, seq, reason)

        monkeypatch.setattr(scheduler_lib.Scheduler, "finish", leaky)
        words = "pages leaked"
    else:
        monkeypatch.setattr(soak.ji.SamplingParams, "__post_init__", lambda self: None)
        words = "was accepted"
    with pytest.raises(SystemExit) as exit_:
        run_main(soak, *argv)
    out = capsys.readouterr().out
    assert exit_.value.code == 1
    assert words in out and "violations 0" not in out


def test_soak_refuses_bad_flags():
    with pytest.raises(ValueError, match="--runner=mock runs --spec=none or ngram"):
        run_main(soak, "--runner=mock", "--spec=eagle", "--requests=2")
    with pytest.raises(ValueError, match="--requests, --max_prompt_len and --max_output_len must be >= 1"):
        run_main(soak, "--requests=0")


@pytest.mark.slow
def test_soak_10000_requests_on_the_tiny_model():
    """The full soak of benchmarks/results/reliability.md: 10,000 requests with LoRA adapters, prompt-lookup
    speculation and an int8 KV cache, every greedy one checked against serving it alone (about 25 minutes
    on a shared 2-core CPU)."""
    rec = run_soak("--requests=10000", "--seed=0", "--num_adapters=4", "--max_adapters=2", "--spec=ngram",
                   "--spec_tokens=3", "--kv_dtype=int8")
    assert rec["violations"] == [] and rec["summary"]["pages_leaked"] == 0
    assert np.isclose(rec["summary"]["good_requests"] + rec["summary"]["bad_requests"], 10000)
