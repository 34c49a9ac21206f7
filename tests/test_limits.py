"""One limits policy in every library entry (Engine.generate, add_request, stream, ji.generate,
Engine.warmup): a prompt past the context is refused with a ValueError naming the prompt and both
lengths; a prompt that fits but leaves fewer than max_tokens positions ends with "context"."""

from __future__ import annotations

import jax
import pytest

import jaxinfer as ji

CONTEXT = 48


@pytest.fixture(scope="module")
def model():
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=CONTEXT)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(3), std=0.3), ji.ByteTokenizer())


def served_by_steps(engine, prompt, sampling):
    rid = engine.add_request(prompt, sampling)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out
    raise AssertionError("the request never finished")


def every_entry(model, config=None):
    """(name, serve(prompt, sampling) -> RequestOutput) for each library entry."""
    engine = ji.Engine(model, config)
    return [("Engine.generate", lambda p, sp: engine.generate([p], sp)[0]),
            ("Engine.add_request", lambda p, sp: served_by_steps(engine, p, sp)),
            ("Engine.stream", lambda p, sp: list(engine.stream(p, sp))[-1]),
            ("ji.generate", lambda p, sp: ji.generate(model, [p], sp)[0])]


def test_a_prompt_over_the_context_is_refused_everywhere(model):
    long = [7] * (CONTEXT + 5)
    sampling = ji.SamplingParams(max_tokens=4)
    for name, serve in every_entry(model):
        with pytest.raises(ValueError, match=rf"prompt.* has {CONTEXT + 5} tokens, over the model's context of "
                                             rf"{CONTEXT}"):
            serve(long, sampling)
    engine = ji.Engine(model)
    with pytest.raises(ValueError, match=rf"prompts\[1\]: prompt has {CONTEXT + 5} tokens"):
        engine.generate([[1, 2], long], sampling)
    assert not engine.has_unfinished() and engine.allocator.num_used == 0  # nothing of the batch was queued
    text = "a" * CONTEXT  # a string prompt: measured in its tokens (BOS and one per byte)
    n = len(model.tokenizer.encode(text))
    with pytest.raises(ValueError, match=rf"prompts\[0\]: prompt has {n} tokens, over the model's context"):
        engine.generate([text], sampling)


def test_the_engines_max_seq_len_is_its_context(model):
    """With max_seq_len below the model's context, the engine refuses and cuts at max_seq_len."""
    short = ji.EngineConfig(max_seq_len=32)
    for name, serve in every_entry(model, short)[:3]:
        with pytest.raises(ValueError, match="prompt has 33 tokens, over the engine's max_seq_len=32"):
            serve([7] * 33, ji.SamplingParams(max_tokens=4))
        out = serve([7] * 30, ji.SamplingParams(max_tokens=10, temperature=0.0))
        assert out.finish_reason == "context" and len(out.token_ids) == 32 - 30 + 1, name


def test_a_prompt_that_leaves_less_room_than_max_tokens_ends_with_context(model):
    prompt, sampling = [5] * (CONTEXT - 4), ji.SamplingParams(max_tokens=20, temperature=0.0)
    outs = {name: serve(prompt, sampling) for name, serve in every_entry(model)}
    reference = outs["ji.generate"]
    assert reference.finish_reason == "context" and len(reference.token_ids) == 4 + 1
    for name, out in outs.items():
        assert (out.finish_reason, out.token_ids) == ("context", reference.token_ids), name
    fits = ji.SamplingParams(max_tokens=5, temperature=0.0)  # exactly the room: max_tokens ends it first
    assert all(serve(prompt, fits).finish_reason == "length" for _, serve in every_entry(model))


def test_max_tokens_past_the_context_is_refused_everywhere(model):
    sampling = ji.SamplingParams(max_tokens=CONTEXT + 1)
    for name, serve in every_entry(model):
        with pytest.raises(ValueError, match=rf"max_tokens={CONTEXT + 1} is over the (engine's max_seq_len=|model's "
                                             rf"context of ){CONTEXT}"):
            serve([1, 2, 3], sampling)


def test_warmup_refuses_lengths_past_max_seq_len(model):
    engine = ji.Engine(model, ji.EngineConfig(max_seq_len=32))
    with pytest.raises(ValueError, match=r"max_len=100 is outside \[1, 32\] \(the engine's max_seq_len\)"):
        engine.warmup(max_len=100)
    with pytest.raises(ValueError, match=r"max_prompt_len=40 is outside \[1, max_len=32\]"):
        engine.warmup(max_prompt_len=40)
    with pytest.raises(ValueError, match=r"max_prompt_len=20 is outside \[1, max_len=16\]"):
        engine.warmup(max_prompt_len=20, max_len=16)
    with pytest.raises(ValueError, match=r"max_len=0 is outside"):
        engine.warmup(max_len=0)
