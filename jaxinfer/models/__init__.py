"""Models: what a network is and how it runs on the device.

  config      ModelConfig (read from HF's config.json by its family), RoPE settings
  family      model-family specs (params, roles, checkpoint names, norm, activation, layer) and their registry
  norms       the norms and gate activations a family names
  llama       the Llama-style families: Llama, Mistral, Qwen2, Qwen3
  gemma       Gemma 2 and Gemma 3 (text)
  phi3        Phi-3 (its fused q/k/v and gate/up tensors split at load)
  moe         mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE (grouped matmuls over the experts)
  gpt_oss     gpt-oss: experts with biases and a clamped SwiGLU, attention sinks, YaRN
  deepseek    DeepSeek-V2 / V3: multi-head latent attention (expanded form; dense layers so far)
  layers      rotary embeddings (a building block of layer functions)
  decoder     the functional decoder: params, forward over a contiguous or paged cache, logits
  attention   the attention dispatch point (XLA reference, Pallas kernels)
  latent_attention  multi-head latent attention over a latent paged cache (absorbed / expanded)
  matmul      the matmul dispatch point (dense, quantised weights, W8A8)
  mesh        programs under a mesh: tp / ep meshes set for tracing, kernels and experts per shard
  kv_cache    the KV-cache pytrees and the batch descriptor of one step
  formats     packed weight formats; act_formats: simulated and W8A8 activation formats

The built-in families register themselves when their modules are imported, here; a family of
one's own registers itself the same way (jaxinfer.models.family.register) wherever it is defined.
"""

from jaxinfer.models import deepseek, gemma, gpt_oss, llama, moe, phi3  # noqa: F401  (register the built-in families)
