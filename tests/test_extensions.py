"""The seams hold: each kind of extension is added from outside the library, with no edit to it.

- A drafter: a class defined here, registered by method name (jaxinfer.speculative.register_drafter),
  runs through the engine's verify passes losslessly.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer.buckets import next_power_of_2
from jaxinfer.speculative import DRAFTERS, Proposal, register_drafter

GREEDY = ji.SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):"]


@pytest.fixture(scope="module")
def tiny():
    return ji.load_model("tiny")


class OracleDrafter:
    """Proposes the continuation it was told (the target's own greedy tokens), wrong at every
    third generated position: some drafts are accepted, some rejected, none may change the output."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], vocab_size: int):
        self.answers, self.vocab_size = answers, vocab_size

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        tokens = np.zeros((next_power_of_2(len(seqs)), k), np.int32)
        for i, (s, want) in enumerate(zip(seqs, num_drafts)):
            answer, g = self.answers[tuple(s.tokens[: s.prompt_len])], len(s.generated)
            for j in range(want):
                t = answer[g + j] if g + j < len(answer) else 0
                tokens[i, j] = (t + 1) % self.vocab_size if (g + j) % 3 == 2 else t
        return Proposal(tokens, None)

    def accepted(self, seqs) -> None:
        pass

    def copy_pages(self, copies) -> None:
        pass


def test_a_drafter_defined_outside_the_library_runs_losslessly(tiny, monkeypatch):
    plain = ji.Engine(tiny, ji.EngineConfig(max_batch=4)).generate(PROMPTS, GREEDY)
    answers = {tuple(o.prompt_token_ids): o.token_ids for o in plain}
    monkeypatch.setitem(DRAFTERS, "oracle", None)  # registered below; removed again after the test

    @register_drafter("oracle", checkpoint=False, features=False, distributions=False)
    def build(ctx):
        assert ctx.path is None and ctx.target.config == tiny.config
        return OracleDrafter(answers, ctx.target.config.vocab_size)

    spec = ji.SpeculativeConfig(method="oracle", num_tokens=4)
    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=4, speculative=spec))
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    m = engine.metrics()
    # Two of every three drafts are right: chains of 2 are accepted, each pass emits about 3 tokens.
    assert 0.3 < m["spec_acceptance_rate"] < 0.9 and m["spec_tokens_per_pass"] > 2.0, m
    assert m["spec_accepted"] >= 10
