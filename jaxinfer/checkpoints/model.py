"""The loaded-model bundle: what a checkpoint loader returns and what the engine serves."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.checkpoints.tokenizer import Tokenizer
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.decoder import Params


@dataclasses.dataclass
class Model:
    """A loaded model: static config, params pytree, and a tokenizer (None: token ids only).
    placement: None (params on the default device), or where jaxinfer.sharding placed them (a
    tensor-parallel mesh; the config is then the model as it runs, KV heads replicated if tp > K)."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None = None
    name: str = ""
    placement: Any = None

    @property
    def dtype(self):
        return self.params["embed"].dtype
