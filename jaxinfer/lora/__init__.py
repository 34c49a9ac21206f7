"""LoRA adapters (PEFT format) served many at once over one base model, as S-LoRA and Punica do:
the base forward is shared and each token adds its own low-rank delta.

  adapter.py   load a PEFT adapter directory, check it against a base model, write one, draw one
  batched.py   device slots (LoraWeights), the delta through the model's projection hook (LoraBatch,
               BGMV / SGMV through pallas_kernels.lora_matmul or gather + einsum), merge, and a
               forward with an adapter per row
  registry.py  the engine's adapters: host store, device slots, LRU swap, refcounts of running sequences

  adapter = ji.load_adapter(path)
  merged = jaxinfer.lora.merge(model, adapter)            # the reference: weights folded in
  engine = ji.Engine(model, ji.EngineConfig(max_adapters=8, max_lora_rank=16))
  engine.add_adapter("a", path); engine.generate(prompts, sampling, adapters=["a", None])
"""

from jaxinfer.lora.adapter import (
    MODULES, PROJECTIONS, AdapterError, LoraAdapter, check_fits, load_adapter, random_adapter, save_adapter,
)
from jaxinfer.lora.batched import (
    IMPLEMENTATIONS, LoraBatch, LoraWeights, SlotConfig, apply, forward_logits, merge, slot_rank, with_adapters,
    write_slot,
)
from jaxinfer.lora.registry import AdapterRegistry

__all__ = [
    "IMPLEMENTATIONS", "MODULES", "PROJECTIONS", "AdapterError", "AdapterRegistry", "LoraAdapter", "LoraBatch",
    "LoraWeights", "SlotConfig", "apply", "check_fits", "forward_logits", "load_adapter", "merge", "random_adapter",
    "save_adapter", "slot_rank", "with_adapters", "write_slot",
]
