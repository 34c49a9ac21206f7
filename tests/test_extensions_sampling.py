"""Proof that the sampler's seam holds, with no edit to the library: a logits processor defined here
(ban one token) is registered, asked for by some requests through SamplingParams.extra_args, and
takes effect inside the jitted step under continuous batching, next to requests that do not ask."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxinfer as ji
from jaxinfer.checkpoints.weights import ASSETS_DIR
from jaxinfer.sampling import Processor, register, unregister

traced = []  # what the processor saw each time a program that carries it was traced


def fill(rows, vocab):
    """The banned token of each row (a row that does not ask: the vocabulary size, which bans nothing)."""
    return {"token": np.asarray([r.sampling.extra_args["ban"] if r is not None else vocab.size for r in rows],
                                np.int32)}


def ban(logits, arrays, ctx):
    traced.append(isinstance(logits, jax.core.Tracer))
    return logits.at[jnp.arange(logits.shape[0]), arrays["token"]].set(-jnp.inf, mode="drop")


def check(params, vocab):
    if not 0 <= params.extra_args["ban"] < vocab.size:
        raise ValueError(f"extra_args['ban'] must be a token id in [0, {vocab.size})")


BAN = Processor("ban", asks=lambda sp: "ban" in (sp.extra_args or {}), fill=fill, apply=ban, check=check)


@pytest.fixture
def registered():
    register(BAN)
    yield
    unregister("ban")


def test_a_processor_defined_here_bans_its_token_in_the_jitted_step(registered):
    tiny = ji.load_model("tiny")
    prompts = [tiny.tokenizer.encode(p) for p in ("def fibonacci(n):", "The quick brown fox", "import os\nimport",
                                                  "def fibonacci(n):")]
    plain = ji.SamplingParams(max_tokens=12, temperature=0.0)
    banned = ji.SamplingParams(max_tokens=12, temperature=0.0, extra_args={"ban": 32})  # the space
    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=2, page_size=8))  # four requests through two slots
    outs = engine.generate(prompts, [banned, plain, banned, plain])
    assert traced and all(traced)  # it ran while the step was traced: inside the jitted program

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS_DIR, "tiny"), dtype=torch.float32)
    for prompt, out, bad in zip(prompts, outs, ([[32]], None, [[32]], None)):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              bad_words_ids=bad, eos_token_id=list(tiny.tokenizer.eos_ids), pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    assert all(32 not in o.token_ids for o in outs[::2]) and all(32 in o.token_ids for o in outs[1::2])
    with pytest.raises(ValueError, match=r"extra_args\['ban'\] must be a token id in \[0, 258\)"):
        engine.add_request(prompts[0], ji.SamplingParams(extra_args={"ban": 999}))
