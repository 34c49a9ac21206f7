"""Hashes of the decoder's traced programs, to show a change left them as they were.

Run it against two trees and compare the lines (no compile, a few seconds on the CPU):
    PYTHONPATH=/path/to/old/tree python benchmarks/jaxpr_hashes.py
    PYTHONPATH=. python benchmarks/jaxpr_hashes.py
It prints one JSON object: program -> the first 16 hex digits of the sha256 of `jax.make_jaxpr` of
`decoder.forward` for the tiny model and random Mixtral, Gemma 2 (soft-cap, windows) and Qwen3
configs, with the XLA and the Pallas attention.
"""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer as ji
from jaxinfer.models import decoder

RANDOM = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
          "gemma2": dict(attn_logit_softcapping=3.0, sliding_window=4), "qwen3": {}}


def main() -> None:
    tokens = jnp.asarray(np.arange(12).reshape(1, 12) % 60, jnp.int32)
    positions = jnp.arange(12, dtype=jnp.int32)[None]
    tiny = ji.load_model("tiny")
    cases = [("tiny", tiny.config, tiny.params)]
    for model_type, extra in RANDOM.items():
        cfg = ji.ModelConfig.from_hf_dict(dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, **extra))
        cases.append((model_type, cfg, ji.init_params(cfg, jax.random.key(0))))
    out = {}
    for name, cfg, params in cases:
        for impl in ("xla", "pallas"):
            def logits(p, t, cfg=cfg, impl=impl):
                return decoder.forward(p, cfg, t, positions, impl=decoder.Impl(attention=impl)).logits

            text = str(jax.make_jaxpr(logits)(params, tokens))
            out[f"{name}-{impl}"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
