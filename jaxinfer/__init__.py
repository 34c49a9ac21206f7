"""jaxinfer: a pure-JAX research framework for LLM inference optimisation."""

from jaxinfer.config import ConfigError, ModelConfig, RopeConfig
from jaxinfer.generation import RequestOutput, generate
from jaxinfer.model import KVCache, forward, forward_logits, init_params
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import ByteTokenizer, HFTokenizer
from jaxinfer.weights import CheckpointError, Model, load_model, save_model

__all__ = [
    "ByteTokenizer",
    "CheckpointError",
    "ConfigError",
    "HFTokenizer",
    "KVCache",
    "Model",
    "ModelConfig",
    "RequestOutput",
    "RopeConfig",
    "SamplingParams",
    "forward",
    "forward_logits",
    "generate",
    "init_params",
    "load_model",
    "save_model",
]
