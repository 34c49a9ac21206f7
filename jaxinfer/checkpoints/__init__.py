"""Checkpoints: from files on disk to a loaded Model and back.

  model       the Model bundle (config, params, tokenizer, placement)
  weights     load_model / save_model: HF safetensors directories, GGUF files, the shipped models
  hf_layout   HF tensor names (the family spec's) and shapes for the decoder's params
  gguf        llama.cpp's GGUF files (llama and Mixtral, qwen2, qwen3, qwen3moe, qwen2moe, phi3, gemma2,
              gemma3, gpt-oss), packed or dequantised; gguf_blocks: their tensors' blocks;
              gguf_tokenizer: their tokenizers
  quantized   AutoAWQ / GPTQ checkpoints and jaxinfer's own quantised format
  tokenizer   byte-level and HF tokenizers, chat templates
"""
