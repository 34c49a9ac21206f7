"""Sampling: per-request SamplingParams and the batched sampler of the jitted step."""

from jaxinfer.sampling.sampler import NONFINITE, SamplingBatch, SamplingParams, filtered_probs, sample, sample_checked

__all__ = ["NONFINITE", "SamplingBatch", "SamplingParams", "filtered_probs", "sample", "sample_checked"]
