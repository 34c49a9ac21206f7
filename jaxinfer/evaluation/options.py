"""An engine from lm-eval model arguments: `--model_args model=tiny,quant=int8,kv_dtype=int8,...`
names the model and every option a researcher sweeps, and this module turns them into the
library's own objects (load_model, the quantisation transform, EngineConfig, SpeculativeConfig,
an adapter in the engine's LoRA slots). It needs no lm-eval: the backend (backend.py) calls it.

  model       a name ji.load_model knows (tiny, smollm2-135m), a GGUF file or a checkpoint directory
  dtype       float32 (default), bfloat16 or float16
  quant       a weight scheme of jaxinfer.quant.spec (dense, int8, int4-rtn-g128, int4-awq-g128,
              w8a8-int8-smooth, w8a8-fp8, ...); calibrated schemes draw their calibration windows
              with `seed`, calib_sequences windows of calib_len tokens (default 256 x 256, as
              experiments.quant_eval); a checkpoint that loads packed (a Q4 GGUF file) is dequantised first
              and re-quantised from there, as experiments.quant_eval does
  spec        a speculative method (jaxinfer.speculative.DRAFTERS) or none; spec_tokens (k) and
              spec_draft (default: the method's shipped drafter)
  adapter     a PEFT LoRA directory, served through the engine's adapter slots (max_adapters=1)
  any EngineConfig field: kv_dtype, max_batch, page_size, max_seq_len, max_tokens_per_step,
              prefix_cache, attention, matmul, kv_budget_tokens, tp, ...

lm-eval hands values over parsed ("8" -> 8, "true" -> True, "none" -> None); an unknown argument
is refused with a ValueError naming it, before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jaxinfer as ji
from jaxinfer import quant
from jaxinfer.quant import calibration as calib
from jaxinfer.engine.config import EngineConfig
from jaxinfer.quant.spec import scheme_from_name
from jaxinfer.speculative import DRAFTERS
from jaxinfer.speculative.config import SHIPPED_DRAFTERS

ADAPTER = "eval"  # the name the adapter is added under
# The engine options taken as they are (speculative is built from the spec* arguments).
ENGINE_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "speculative")
MODEL_OPTIONS = ("model", "dtype", "quant", "seed", "calib_sequences", "calib_len", "spec", "spec_tokens", "spec_draft",
                 "adapter")
# The shipped drafter of each method that needs one (a method's default spec_draft).
DEFAULT_DRAFTS = {method: name for name, method in SHIPPED_DRAFTERS.items()}


class Built(NamedTuple):
    engine: ji.Engine
    adapter: str | None  # the adapter's name in the engine, or None: the base model
    options: dict  # the arguments as taken, defaults filled in (what a result records)


def check_options(args: dict) -> dict:
    """The model arguments checked and completed with defaults, before any model loads: ValueError
    naming an unknown argument or a bad value."""
    unknown = sorted(set(args) - set(MODEL_OPTIONS) - set(ENGINE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model argument(s) {', '.join(unknown)}; known: "
                         f"{', '.join(MODEL_OPTIONS + ENGINE_OPTIONS)}")
    options = {"dtype": "float32", "quant": "dense", "seed": 0, "calib_sequences": calib.DEFAULT_NUM_SEQUENCES,
               "calib_len": calib.DEFAULT_SEQ_LEN, "spec": "none", "spec_tokens": 5,
               "spec_draft": None, "adapter": None, **args}
    if not isinstance(options.get("model"), str) or not options["model"]:
        raise ValueError("model is required: a shipped model name (tiny, smollm2-135m), a GGUF file or a "
                         f"checkpoint directory, got {options.get('model')!r}")
    if options["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={options['dtype']!r} is not one of float32, bfloat16, float16")
    try:
        scheme_from_name(str(options["quant"]))
    except ValueError as e:
        raise ValueError(f"quant={options['quant']!r}: {e}") from None
    if options["spec"] not in ("none", *DRAFTERS):
        raise ValueError(f"spec={options['spec']!r} is not one of none, {', '.join(DRAFTERS)}")
    for name, least in (("spec_tokens", 1), ("seed", 0), ("calib_sequences", 1), ("calib_len", 1)):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    if options["adapter"] is not None and not os.path.isdir(str(options["adapter"])):
        raise ValueError(f"adapter={options['adapter']!r} is not a directory (a PEFT LoRA adapter)")
    engine_config(options)  # EngineConfig checks its own fields
    return options


def engine_config(options: dict) -> EngineConfig:
    """The EngineConfig the options describe (speculative from spec*, one adapter slot for adapter)."""
    values = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
    if options["spec"] != "none":
        draft = options["spec_draft"] or DEFAULT_DRAFTS.get(options["spec"])
        values["speculative"] = ji.SpeculativeConfig(method=options["spec"], num_tokens=options["spec_tokens"],
                                                     draft=draft)
    if options["adapter"] is not None:
        values["max_adapters"] = max(1, values.get("max_adapters", 0))
    return EngineConfig(**values)


def build(args: dict) -> Built:
    """The engine the model arguments describe: the model loaded at dtype, quantised by `quant` (from dense weights),
    served under the EngineConfig, with the adapter added."""
    options = check_options(args)
    config = engine_config(options)
    model = ji.load_model(options["model"], dtype=options["dtype"])
    if scheme_from_name(str(options["quant"])) is not None and any(
            isinstance(w, quant.PACKED) for w in model.params["layers"].values()):
        model = dataclasses.replace(model, params=quant.dequantize_params(model.params))  # a packed GGUF / GPTQ file
    model = quant.quantize_by_name(model, str(options["quant"]), seed=options["seed"], progress=False,
                                   num_sequences=options["calib_sequences"], seq_len=options["calib_len"])
    engine = ji.Engine(model, config)
    if options["adapter"] is not None:
        engine.add_adapter(ADAPTER, str(options["adapter"]))
    return Built(engine, ADAPTER if options["adapter"] is not None else None, options)

