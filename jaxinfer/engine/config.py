"""EngineConfig: everything an engine is built from that is not the model (frozen, hashable),
and the KV-cache sizing it implies."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxinfer import memory
from jaxinfer.engine.batch import Bucket, Layout
from jaxinfer.lora import IMPLEMENTATIONS as LORA_IMPLEMENTATIONS
from jaxinfer.lora import SlotConfig
from jaxinfer.models.decoder import Impl, attention_impl_for, auto_impl
from jaxinfer.models.kv_cache import KV_DTYPES
from jaxinfer.sampling.params import check_timeout
from jaxinfer.speculative.config import SpeculativeConfig

SCALE_BYTES = 4  # a quantised cache's float32 scale per token and kv head, for each of K and V


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batching: str = "continuous"  # "continuous": refill slots every step; "static": wait for the batch to drain
    kv_layout: str = "paged"  # "paged": pages on demand; "contiguous": max_seq_len reserved per request up front
    page_size: int = 16  # tokens per KV page (paged layout)
    num_pages: int | None = None  # KV budget in pages (paged) or request slots (contiguous)
    kv_budget_tokens: int | None = None  # KV budget in tokens, when num_pages is not given
    kv_budget_bytes: int | None = None  # KV budget in bytes (pages of kv_dtype, scales included), when neither is
    kv_dtype: str | None = None  # the KV cache's dtype: None (the model's), "int8" or "fp8" (per-token scales)
    max_batch: int = 8  # sequences running at once
    max_tokens_per_step: int = 256  # token budget of one step (decode tokens + prompt chunks)
    chunked_prefill: bool = True  # split prompts across steps to fit the budget
    prefix_cache: bool = True  # reuse full KV pages of identical prompt prefixes
    max_seq_len: int | None = None  # None: the model's context length
    # "auto" (the default of these three): the Pallas kernels on a GPU, the XLA path elsewhere; the
    # config holds the resolved name, so it says which ran.
    attention: str = "auto"  # "xla" | "pallas" | "auto"
    matmul: str = "auto"  # how packed weights are multiplied: "xla" (dequantise) | "pallas" (kernel) | "auto"
    decode_steps: int = 1  # decode steps per host round trip when a step has no prompt work
    overlap: bool = True  # dispatch the next decode call before reading the last one's tokens back
    # Draft and verify tokens (jaxinfer.speculative); decode-only steps then verify drafts instead of
    # running decode calls (decode_steps and overlap do not apply). None: plain decoding.
    speculative: SpeculativeConfig | None = None
    max_adapters: int = 0  # LoRA adapters held on the device at once (slots); 0 = no adapters
    max_lora_rank: int = 16  # the largest adapter rank the slots take (stored padded to a power of two >= 16)
    lora_impl: str = "auto"  # how each token's LoRA delta is applied: "xla" (gather + einsum) | "pallas" (BGMV/SGMV)
    # Tensor parallel over the first tp devices (jaxinfer.sharding): params and KV cache split, placed
    # once. 1: one device, nothing placed. A model already placed (load_model(..., mesh=)) must match.
    tp: int = 1
    # Expert parallel (a mixture-of-experts model): the experts split on E over ep groups of tp devices,
    # tp x ep devices in all (jaxinfer.sharding). 1: the experts split over tp only, like the dense MLP.
    ep: int = 1
    request_timeout_s: float | None = None  # deadline of a request without its own SamplingParams.timeout_s
    structured_backend: str = "llguidance"  # grammar backend of structured output: "llguidance" | "xgrammar" (an extra)
    # How the step runs the layers: "scan" over the stacked weights (compile time flat in depth), or
    # "unroll" over one array per layer (the engine holds a per-layer copy of the weights; on the CPU
    # 1.5x faster decode in float32 and ~4x in bfloat16 for SmolLM2, compile ~3x longer: cpu_dots.md;
    # ep = 1; under tp each layer's weights keep their split). "auto": unrolled on the CPU for a
    # bfloat16 / float16 or W8A8 model at tp = ep = 1 (a scan over such stacked weights is converted
    # whole every step there), and for a model whose layers differ (DeepSeek's dense first layers),
    # the scan elsewhere; the engine's config holds the resolved name (`layer_loop_for`).
    layer_loop: str = "auto"
    # Multi-head latent attention (DeepSeek) over its latent cache: the form of decode steps' and of
    # prompt chunks' attention, "absorbed" (the query taken into latent space) or "expanded" (the
    # context up-projected to per-head keys and values): jaxinfer.models.latent_attention.MLA_FORMS.
    mla_decode: str = "absorbed"
    mla_prefill: str = "expanded"

    def __post_init__(self):
        for name, allowed in (("batching", ("continuous", "static")), ("kv_layout", ("paged", "contiguous")),
                              ("structured_backend", ("llguidance", "xgrammar")), ("layer_loop", ("auto", "scan", "unroll"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")
        lora_auto = self.lora_impl == "auto"
        if self.kv_dtype not in (None, *KV_DTYPES):
            raise ValueError(f"kv_dtype={self.kv_dtype!r} is not one of None, {', '.join(map(repr, KV_DTYPES))}")
        object.__setattr__(self, "attention", attention_impl_for(self.attention, self.kv_dtype))
        for name in ("matmul", "lora_impl"):
            object.__setattr__(self, name, auto_impl(getattr(self, name)))
        self.impl()  # checks the attention, matmul and MLA forms
        for name in ("page_size", "max_batch", "max_tokens_per_step", "decode_steps", "num_pages", "kv_budget_tokens",
                     "kv_budget_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"speculative is a {type(self.speculative).__name__}, not ji.SpeculativeConfig")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 2")
        if self.max_adapters < 0:
            raise ValueError(f"max_adapters={self.max_adapters} must be >= 0")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank={self.max_lora_rank} must be >= 1")
        for name in ("tp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.layer_loop == "unroll" and self.ep > 1:
            raise ValueError(f"layer_loop='unroll' with ep={self.ep}: the experts run per ep shard over their "
                             "stacked weights; use layer_loop='scan'")
        if self.lora_impl not in LORA_IMPLEMENTATIONS:
            raise ValueError(f"lora_impl={self.lora_impl!r} is not one of {LORA_IMPLEMENTATIONS}")
        if self.tp > 1 and self.max_adapters and self.lora_impl == "pallas":
            if not lora_auto:
                raise ValueError(f"lora_impl='pallas' with tp={self.tp}: the BGMV/SGMV kernels do not run per "
                                 "shard; use lora_impl='xla'")
            object.__setattr__(self, "lora_impl", "xla")  # "auto" under tensor parallelism: the XLA path
        check_timeout("request_timeout_s", self.request_timeout_s)

    def impl(self) -> Impl:
        """How the model's ops run in this engine's programs (jaxinfer.models.decoder.Impl)."""
        return Impl(self.attention, self.matmul, mla_decode=self.mla_decode, mla_prefill=self.mla_prefill)

    def lora_slots(self) -> SlotConfig | None:
        """The adapter slots a model runner holds, or None without adapters."""
        return SlotConfig(self.max_adapters, self.max_lora_rank, self.lora_impl) if self.max_adapters else None

    def seq_len(self, model_config) -> int:
        """The longest sequence the engine serves: max_seq_len, or the model's context."""
        context = model_config.max_position_embeddings
        if self.max_seq_len is not None and self.max_seq_len > context:
            raise ValueError(f"max_seq_len={self.max_seq_len} is over the model's context of {context}")
        return self.max_seq_len or context

    def buckets(self, layout: Layout, max_prompt_len: int, max_len: int) -> list[Bucket]:
        """Every program shape an engine with this config can run over `layout` (Layout.possible_buckets)."""
        return layout.possible_buckets(
            max_batch=self.max_batch, max_tokens_per_step=self.max_tokens_per_step,
            chunked_prefill=self.chunked_prefill, decode_steps=self.decode_steps,
            multi_step_decode=self.decode_steps > 1 or self.overlap, max_prompt_len=max_prompt_len, max_len=max_len,
            speculative_tokens=self.speculative.num_tokens if self.speculative else 0)

    def kv_pages(self, model, max_seq_len: int) -> tuple[int, int]:
        """(num_pages, page_size) of the KV cache. The contiguous layout reserves one "page" of
        max_seq_len tokens per request at admission (as serving systems did before PagedAttention).
        A byte budget buys pages of kv_dtype (int8 / fp8: about twice a bfloat16 cache's); it is the
        whole cache's, all tensor-parallel shards together (each device holds 1 / tp of it)."""
        page_size = max_seq_len if self.kv_layout == "contiguous" else self.page_size
        if self.num_pages is not None:
            return self.num_pages, page_size
        budget, name = self.kv_budget_tokens, f"kv_budget_tokens={self.kv_budget_tokens}"
        if budget is None and self.kv_budget_bytes is not None:
            kv = self.kv_dtype or jnp.dtype(model.dtype).name
            budget = self.kv_budget_bytes // memory.kv_bytes_per_token(model.config, kv, SCALE_BYTES if self.kv_dtype else 0)
            name = f"kv_budget_bytes={self.kv_budget_bytes} ({budget} tokens of {kv})"
        if budget is not None:
            if budget < page_size:
                raise ValueError(f"{name} is too small for even one request "
                                 f"(one {self.kv_layout} allocation is {page_size} tokens)")
            return budget // page_size, page_size
        return self.max_batch * math.ceil(max_seq_len / page_size), page_size
