"""Models: what a network is and how it runs on the device.

  config      ModelConfig (read from HF's config.json), RoPE settings
  decoder     the functional decoder: params, forward over a contiguous or paged cache, logits
  attention   the attention dispatch point (XLA reference, Pallas kernels)
  matmul      the matmul dispatch point (dense, quantised weights, W8A8)
  kv_cache    the KV-cache pytrees and the batch descriptor of one step
  formats     packed weight formats; act_formats: simulated and W8A8 activation formats
"""
