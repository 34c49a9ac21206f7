"""Sampling: per-request SamplingParams (params.py), the logits processors and their registry
(processors.py), and the batched sampler of the jitted step (sampler.py)."""

from jaxinfer.sampling.params import SamplingParams
from jaxinfer.sampling.processors import Processor, Row, Vocab, register, unregister
from jaxinfer.sampling.sampler import (
    NONFINITE,
    Logprob,
    Sampled,
    SamplingBatch,
    TokenLogprobs,
    draw,
    row_keys,
    sample,
    sample_checked,
)

__all__ = ["NONFINITE", "Logprob", "Processor", "Row", "Sampled", "SamplingBatch", "SamplingParams", "TokenLogprobs",
           "Vocab", "draw", "register", "row_keys", "sample", "sample_checked", "unregister"]
