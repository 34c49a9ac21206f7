"""jaxinfer: a pure-JAX research framework for LLM inference optimisation."""

from jaxinfer.checkpoints.tokenizer import ByteTokenizer, HFTokenizer
from jaxinfer.checkpoints.weights import CheckpointError, Model, load_model, save_hf_checkpoint, save_model
from jaxinfer.engine.baseline import generate
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import RequestOutput
from jaxinfer.lora import LoraAdapter, load_adapter
from jaxinfer.models.config import ConfigError, ModelConfig, RopeConfig
from jaxinfer.models.decoder import forward, forward_logits, init_params
from jaxinfer.models.kv_cache import KVCache, PagedKVCache
from jaxinfer.sampling.params import SamplingParams
from jaxinfer.speculative import DraftTree, SpeculativeConfig
from jaxinfer.structured import StructuredOutput

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
    "StructuredOutput",
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
