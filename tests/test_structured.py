"""Structured output (jaxinfer/structured; SamplingParams.structured; the server's response_format
and structured_outputs).

References nobody here wrote: `jsonschema` validates every finished JSON output against its schema,
Python's `re` checks regex outputs, and HF transformers' greedy decoding on the tiny model's HF
twin, with llguidance's own matcher driven token by token over HF's logits (mask, then argmax), gives
the greedy constrained tokens the engine must produce."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import llguidance
import numpy as np
import openai
import pytest
import torch
from llguidance.numpy import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask
from experiments._structured_schemas import corpus, sample

import jaxinfer as ji
from jaxinfer import lora, structured
from jaxinfer.engine import runner as runner_lib
from jaxinfer.sampling.processors import pack_bitmask
from jaxinfer.serving import server

PROMPT = "Answer in JSON:"
REGEX = r"[a-c]{2,4}-[0-9]{2}"
CHOICE = ["yes", "no", "maybe so", "a|b (c)"]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def _validator(schema):
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _check_json(out, schema):
    """A finished output parses and validates; one cut short says "length"."""
    if out.finish_reason == "stop":
        errors = list(_validator(schema).iter_errors(json.loads(out.text)))
        assert not errors, (out.text, errors[0].message)
    else:
        assert out.finish_reason == "length", (out.finish_reason, out.error)
        assert len(out.token_ids) == out.metrics["generated_tokens"]


def _sp(max_tokens=64, temperature=1.0, seed=0, **constraint):
    return ji.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                             structured=ji.StructuredOutput(**constraint))


@pytest.fixture(scope="module")
def engine(tiny):
    return ji.Engine(tiny, ji.EngineConfig(max_batch=16))


# The constraint and the backend --------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1]}, "json_schema must be a JSON object"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"choice": "yes"}, "choice must be a list of strings"),
    ({"choice": ["a", ""]}, "non-empty list of non-empty strings"),
    ({"json_object": 1}, "json_object must be True or False"),
])
def test_bad_constraints_are_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ji.StructuredOutput(**kwargs)
    with pytest.raises(ValueError, match="structured must be a jaxinfer.StructuredOutput"):
        ji.SamplingParams(structured={"regex": "a"})
    with pytest.raises(ValueError, match="min_tokens=2 cannot be combined with structured output"):
        ji.SamplingParams(min_tokens=2, structured=ji.StructuredOutput(regex="b?"))


def test_matcher_follows_a_document_and_rolls_back(tiny):
    """Over a valid document's tokens: each token is in the mask before it, the matcher is complete
    only at the end (then only EOS is allowed), a rollback restores the earlier mask, a fork is
    independent, and a token outside the grammar is refused."""
    backend = structured.LLGuidanceBackend(tiny.tokenizer.to_json(), tiny.config.vocab_size, [257])
    m = backend.matcher(backend.compile(ji.StructuredOutput(json_schema=PERSON)))
    doc = tiny.tokenizer.encode('{"name":"ab","age":42}', add_special_tokens=False)
    words = np.zeros(-(-tiny.config.vocab_size // 32), np.int32)
    masks = []
    for token in doc:
        assert not m.complete
        m.fill(words)
        masks.append(words.copy())
        assert (words[token // 32] >> (token % 32)) & 1, token
        assert m.advance(token)
    assert m.complete
    m.fill(words)
    allowed = np.zeros(tiny.config.vocab_size, bool)
    allowed[257] = True
    np.testing.assert_array_equal(words, pack_bitmask(allowed))  # only EOS
    m.rollback(3)
    m.fill(words)
    np.testing.assert_array_equal(words, masks[-3])
    fork = m.fork()
    assert fork.advance(doc[-3]) and not m.complete
    assert not m.advance(ord("x")) and "x" in m.error
    assert fork.error is None and fork.advance(doc[-2])


def test_compiled_constraints_are_cached_and_bad_ones_name_the_field(engine):
    g = engine.grammars
    before = g.cached()
    first = g.compile(ji.StructuredOutput(json_schema={"type": "object", "properties": {"z": {"type": "integer"}}}))
    again = g.compile(ji.StructuredOutput(json_schema={"properties": {"z": {"type": "integer"}}, "type": "object"}))
    assert first is again and g.cached() == before + 1
    for spec, message in [(dict(json_schema={"type": "nonsense"}), "structured.json_schema does not compile "
                                                                   "(llguidance): Invalid type: nonsense"),
                          (dict(regex="a[b"), "structured.regex does not compile (llguidance): "),
                          (dict(grammar="start: foo"), 'structured.grammar does not compile (llguidance): '
                                                       'at 1(8): unknown name: "foo"')]:
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.add_request(PROMPT, _sp(**spec))
    assert not engine.has_unfinished()


SPECULATIVE = {
    "draft chain": ji.SpeculativeConfig(method="draft", num_tokens=4, draft="tiny-draft"),
    "eagle tree": ji.SpeculativeConfig(method="eagle", num_tokens=6, draft="tiny-eagle",
                                       tree=ji.DraftTree(top_k=3, depth=4)),
    "ngram": ji.SpeculativeConfig(method="ngram", num_tokens=3),
}


@pytest.mark.parametrize("method", [
    # all slow (10 s each): structured output's own tests and speculative decoding's stay fast
    pytest.param("draft chain", marks=pytest.mark.slow), pytest.param("eagle tree", marks=pytest.mark.slow),
    pytest.param("ngram", marks=pytest.mark.slow)])
def test_speculative_decoding_keeps_constrained_outputs(tiny, engine, method):
    """Each verified position's mask is the grammar's after the drafts before it (a tree: its
    ancestors), so a verify pass emits the tokens plain constrained decoding draws, at
    temperature 0 and 1 (the sampler's drafter-invariant draw), beside free rows; and the drafts
    are checked: some are accepted, and every output follows its constraint."""
    params = [sp for sp, _ in MIX] + [_sp(40, 0.0, json_schema=PERSON), _sp(24, 0.0, regex=REGEX)]
    plain = engine.generate([PROMPT] * len(params), params)
    e = ji.Engine(tiny, ji.EngineConfig(max_batch=8, speculative=SPECULATIVE[method]))
    spec = e.generate([PROMPT] * len(params), params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert e.metrics()["spec_accepted"] > 0
    _check_json(spec[0], PERSON)
    assert re.fullmatch(REGEX, spec[2].text) and spec[4].text in CHOICE


# The engine ----------------------------------------------------------------------------------


def _run_corpus(engine, schemas, max_tokens):
    outs = engine.generate([PROMPT] * len(schemas), [_sp(max_tokens, 1.0, i, json_schema=s)
                                                     for i, (_, s) in enumerate(schemas)])
    for (label, schema), out in zip(schemas, outs):
        _check_json(out, schema)
    return outs


@pytest.mark.slow  # 5-10 s: the fast tier keeps the greedy comparison with HF
def test_sampled_json_validates_regex_and_choice_match(engine):
    """Temperature 1, a spread of the corpus, with regex and choice rows and a free row in the same
    batch: every finished JSON output validates, most finish, regex and choice outputs match, and a
    budget too small to finish says "length"."""
    schemas = sample(8)
    outs = _run_corpus(engine, schemas, 96)
    assert sum(o.finish_reason == "stop" for o in outs) >= 5
    more = engine.generate([PROMPT] * 5, [_sp(24, 1.0, 1, regex=REGEX), _sp(24, 1.0, 2, choice=CHOICE),
                                          _sp(24, 1.0, 3, json_object=True), ji.SamplingParams(max_tokens=8, seed=4),
                                          _sp(3, 1.0, 5, json_schema=PERSON)])
    assert re.fullmatch(REGEX, more[0].text) and more[0].finish_reason == "stop"
    assert more[1].text in CHOICE and more[1].finish_reason == "stop"
    if more[2].finish_reason == "stop":
        assert isinstance(json.loads(more[2].text), dict)
    assert len(more[3].token_ids) == 8
    assert more[4].finish_reason == "length" and len(more[4].token_ids) == 3


def test_a_temperature_near_float32s_largest_keeps_the_mask(engine):
    """At temperature 2**126 the reciprocal underflows: a banned token must stay banned, not turn
    NaN (a NaN row would draw token 0, outside the grammar)."""
    outs = engine.generate(["0"] * 2, [_sp(16, 2.0**126, 3, json_object=True), _sp(16, 3e38, 4, regex=REGEX)])
    assert outs[0].finish_reason in ("stop", "length") and outs[0].text.startswith("{"), outs[0].error
    assert re.fullmatch(REGEX, outs[1].text), outs[1].error


@pytest.mark.slow
def test_the_whole_corpus_validates(tiny):
    """All 132 schemas of the corpus at temperature 1 on the tiny model."""
    schemas = corpus()
    assert len(schemas) >= 100
    outs = _run_corpus(ji.Engine(tiny, ji.EngineConfig(max_batch=32)), schemas, 128)
    assert sum(o.finish_reason == "stop" for o in outs) >= 0.8 * len(schemas)


def _hf_constrained_greedy(hf, tokenizer_json, prompt, grammar, max_tokens, vocab_size, eos):
    """HF's logits, llguidance's own matcher: mask, argmax, consume, until the grammar stops."""
    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=[eos])
    matcher = llguidance.LLMatcher(tok, grammar)
    mask = allocate_token_bitmask(1, vocab_size)
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(max_tokens):
            r = hf(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = r.past_key_values
            logits = r.logits[0, -1:].float().numpy().copy()
            fill_next_token_bitmask(matcher, mask)
            apply_token_bitmask_inplace(logits, mask)
            token = int(logits[0].argmax())
            out.append(token)
            assert matcher.consume_token(token)
            if token == eos or matcher.is_stopped():
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_equals_hf_with_llguidance_over_its_logits(tiny, hf_tiny, engine):
    prompt = tiny.tokenizer.encode(PROMPT)
    json_grammar = llguidance.LLMatcher.grammar_from_json_schema(PERSON, defaults={"whitespace_flexible": False})
    cases = [(dict(json_schema=PERSON), json_grammar),
             (dict(regex=REGEX), llguidance.LLMatcher.grammar_from_regex(REGEX)),
             (dict(choice=CHOICE), llguidance.LLMatcher.grammar_from_lark(
                 "start: " + " | ".join(json.dumps(c) for c in CHOICE)))]
    before = engine.stats
    outs = engine.generate([prompt] * len(cases), [_sp(40, 0.0, **spec) for spec, _ in cases])
    # Decoded overlapped: each call's forward pass dispatched before the last call's tokens were read,
    # its masks filled once they were applied (a mask filled too early would break the equality below).
    ran = engine.stats
    ran.subtract(before)
    assert ran["lookahead_calls"] > 10 and ran["late_fills"] >= ran["lookahead_calls"]
    for (spec, grammar), out in zip(cases, outs):
        want = _hf_constrained_greedy(hf_tiny, tiny.tokenizer.to_json(), prompt, grammar, 40,
                                      tiny.config.vocab_size, 257)
        assert out.token_ids == want, (spec, out.text, tiny.tokenizer.decode(want))


MIX = [(_sp(48, 1.0, 11, json_schema=PERSON), True), (ji.SamplingParams(max_tokens=20, seed=12), False),
       (_sp(24, 1.0, 13, regex=REGEX), True), (ji.SamplingParams(max_tokens=30, temperature=0.0), False),
       (_sp(24, 1.0, 14, choice=CHOICE), True), (_sp(48, 0.0, json_object=True), True)]


@pytest.mark.parametrize("config", [
    pytest.param(dict(overlap=False), marks=pytest.mark.slow),
    pytest.param(dict(decode_steps=4, max_batch=2, max_tokens_per_step=16),  # multi-step free rows, chunked prefill
                 marks=pytest.mark.slow),
    pytest.param(dict(num_pages=10, page_size=8, max_batch=6), marks=pytest.mark.slow),  # preemption
])
def test_outputs_do_not_depend_on_overlap_or_the_batch(tiny, engine, config):
    """The same requests alone, then together with free rows under other engine configs: equal
    tokens (each row draws with its own key; the matcher follows the row whatever runs beside it)."""
    params = [sp for sp, _ in MIX]
    alone = [engine.generate([PROMPT], [sp])[0].token_ids for sp in params]
    other = ji.Engine(tiny, ji.EngineConfig(**config))
    together = other.generate([PROMPT] * len(params), params)
    assert [o.token_ids for o in together] == alone
    if "num_pages" in config:
        assert other.metrics()["preemptions"] > 0


def test_n_samples_fork_their_matchers_and_stop_strings_still_cut(engine):
    (out,) = engine.generate([PROMPT], [ji.SamplingParams(max_tokens=24, n=3, seed=7,
                                                          structured=ji.StructuredOutput(choice=CHOICE))])
    assert len(out.samples) == 3 and all(s.text in CHOICE and s.finish_reason == "stop" for s in out.samples)
    (cut,) = engine.generate([PROMPT], [ji.SamplingParams(max_tokens=48, temperature=0.0, stop=[","],
                                                          structured=ji.StructuredOutput(json_schema=PERSON))])
    assert cut.finish_reason == "stop" and "," not in cut.text and cut.text.startswith('{"name":')


@pytest.mark.slow  # 4-5 s
def test_a_request_whose_matcher_is_being_built_waits_without_holding_back_the_batch(tiny):
    """A backend whose matchers wait for a signal: the free request runs to its end while the
    constrained one waits unscheduled; once its matcher is built it runs and follows its regex."""
    release = threading.Event()

    class Held(structured.LLGuidanceBackend):
        def matcher(self, compiled):
            release.wait(30)
            return super().matcher(compiled)

    e = ji.Engine(tiny, ji.EngineConfig(max_batch=4))
    e.grammars = structured.Grammars(lambda: Held(tiny.tokenizer.to_json(), tiny.config.vocab_size, [257]))
    held = e.add_request(PROMPT, _sp(24, 1.0, 1, regex=REGEX))
    free = e.add_request(PROMPT, ji.SamplingParams(max_tokens=6, seed=2))
    done = {}
    while free not in done:
        done.update((o.request_id, o) for o in e.step() if o.finished)
    assert held not in done and e.scheduler.waiting and not e.scheduler.running
    release.set()
    while e.has_unfinished():
        done.update((o.request_id, o) for o in e.step() if o.finished)
    assert re.fullmatch(REGEX, done[held].text) and done[held].finish_reason == "stop"


def test_xgrammar_backend_follows_the_same_constraints(tiny, engine):
    """The optional backend (skipped without the structured-xgrammar extra): sampled JSON validates,
    and greedy regex and choice output equals llguidance's (the same language over a byte-level
    vocabulary gives the same masks)."""
    pytest.importorskip("xgrammar")
    e = ji.Engine(tiny, ji.EngineConfig(max_batch=16, structured_backend="xgrammar"))
    assert e.grammars.backend.name == "xgrammar"
    _run_corpus(e, sample(6), 96)
    sps = [_sp(24, 0.0, regex=REGEX), _sp(24, 0.0, choice=CHOICE), _sp(24, 1.0, 5, choice=CHOICE)]
    assert [o.token_ids for o in e.generate([PROMPT] * 3, sps)] == [o.token_ids for o in engine.generate(
        [PROMPT] * 3, sps)]
    # Its matchers rolled back after each verify pass's walk over the drafts.
    spec = ji.Engine(tiny, ji.EngineConfig(max_batch=16, structured_backend="xgrammar",
                                           speculative=SPECULATIVE["draft chain"]))
    sps.append(_sp(40, 1.0, 6, json_schema=PERSON))
    assert [o.token_ids for o in spec.generate([PROMPT] * 4, sps)] == [o.token_ids for o in e.generate(
        [PROMPT] * 4, sps)]
    with pytest.raises(ValueError, match=re.escape("structured.regex does not compile (xgrammar)")):
        e.add_request(PROMPT, _sp(regex="a[b"))


@pytest.mark.slow
def test_constrained_rows_under_a_lora_adapter_equal_the_merged_model(tiny):
    """A LoRA adapter's constrained greedy output equals the merged model's, beside a base-model row."""
    adapter = lora.random_adapter(tiny.config, 4, std=0.2, seed=1)
    e = ji.Engine(tiny, ji.EngineConfig(max_adapters=1, max_lora_rank=4))
    e.add_adapter("a", adapter)
    sps = [_sp(40, 0.0, json_schema=PERSON), _sp(24, 0.0, regex=REGEX)]
    outs = e.generate([PROMPT] * 4, sps * 2, adapters=["a", "a", None, None])
    merged = ji.Engine(lora.merge(tiny, adapter)).generate([PROMPT] * 2, sps)
    base = ji.Engine(tiny).generate([PROMPT] * 2, sps)
    assert [o.token_ids for o in outs] == [o.token_ids for o in merged + base]
    assert [o.token_ids for o in merged] != [o.token_ids for o in base]  # the adapter changes the output


def test_a_repeated_constrained_run_compiles_nothing_new(tiny):
    """generate() admits its prompts once their matchers are built, so the second run of the same
    workload steps as the first did (without that, a matcher built a step later regrouped the
    prompt chunks into a step shape the first run had not compiled)."""
    e = ji.Engine(tiny, ji.EngineConfig(max_batch=4, prefix_cache=False))
    params = [_sp(6, 1.0, i, json_schema=s) for i, (_, s) in enumerate(sample(4))]
    first = [o.token_ids for o in e.generate([PROMPT] * 4, params)]
    compiled = sum(runner_lib.TRACE_COUNTS.values())
    assert [o.token_ids for o in e.generate([PROMPT] * 4, params)] == first
    assert sum(runner_lib.TRACE_COUNTS.values()) == compiled


def test_batches_without_constrained_rows_compile_nothing_new(tiny):
    e = ji.Engine(tiny, ji.EngineConfig(max_batch=4))
    free = [ji.SamplingParams(max_tokens=12, seed=i) for i in range(3)]
    first = [o.token_ids for o in e.generate([PROMPT] * 3, free)]
    plain = sum(runner_lib.TRACE_COUNTS.values())
    e.generate([PROMPT] * 2, [_sp(12, 1.0, 1, regex=REGEX), free[0]])
    assert sum(runner_lib.TRACE_COUNTS.values()) > plain  # the constrained batches' own programs
    constrained = sum(runner_lib.TRACE_COUNTS.values())
    assert [o.token_ids for o in e.generate([PROMPT] * 3, free)] == first
    assert sum(runner_lib.TRACE_COUNTS.values()) == constrained


# The server ----------------------------------------------------------------------------------

KEY = "sk-test-key"
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def client(tiny):
    app = server.build_app(ji.Engine(tiny, ji.EngineConfig()), chat_template=TEMPLATE, api_key=KEY)
    with server.BackgroundServer(app) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)


def _streamed(chunks, chat: bool) -> tuple[str, str]:
    text, reason = "", None
    for c in chunks:
        for choice in c.choices:
            text += (choice.delta.content or "") if chat else choice.text
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("stream", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_openai_response_format_on_both_endpoints(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=48, temperature=0, stream=stream,
                                  extra_body={"response_format": fmt})  # the client's completions take it as extra
    text, reason = _streamed(r, chat=False) if stream else (r.choices[0].text, r.choices[0].finish_reason)
    assert reason == "stop" and not list(_validator(PERSON).iter_errors(json.loads(text)))
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=48, temperature=0, response_format={"type": "json_object"},
                                       stream=stream)
    text, reason = _streamed(r, chat=True) if stream else (r.choices[0].message.content, r.choices[0].finish_reason)
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pick"}], max_tokens=16,
                                       temperature=0, stream=stream, extra_body={"structured_outputs": {
                                           "choice": CHOICE}})
    text, reason = _streamed(r, chat=True) if stream else (r.choices[0].message.content, r.choices[0].finish_reason)
    assert text in CHOICE and reason == "stop"


def test_openai_bad_schema_is_a_400_naming_the_field(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], response_format=fmt)
    assert e.value.body["param"] == "response_format"
    assert "response_format.json_schema.schema" in e.value.body["message"] and "Invalid type" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"structured_outputs": {"grammar": "start: x"}})
    assert e.value.body["param"] == "structured_outputs" and "structured_outputs.grammar" in e.value.body["message"]
