"""jaxinfer: a pure-JAX research framework for LLM inference optimisation."""

from jaxinfer.config import ConfigError, ModelConfig, RopeConfig
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.generation import generate
from jaxinfer.kv_cache import KVCache, PagedKVCache
from jaxinfer.lora import LoraAdapter, load_adapter
from jaxinfer.model import forward, forward_logits, init_params
from jaxinfer.requests import RequestOutput
from jaxinfer.sampling import SamplingParams
from jaxinfer.speculative import DraftTree, SpeculativeConfig
from jaxinfer.tokenizer import ByteTokenizer, HFTokenizer
from jaxinfer.weights import CheckpointError, Model, load_model, save_hf_checkpoint, save_model

__all__ = [
    "ByteTokenizer",
    "CheckpointError",
    "ConfigError",
    "HFTokenizer",
    "Engine",
    "EngineConfig",
    "KVCache",
    "LoraAdapter",
    "Model",
    "PagedKVCache",
    "ModelConfig",
    "RequestOutput",
    "RopeConfig",
    "SamplingParams",
    "SpeculativeConfig",
    "DraftTree",
    "forward",
    "forward_logits",
    "generate",
    "init_params",
    "load_adapter",
    "load_model",
    "save_hf_checkpoint",
    "save_model",
]
