"""Quantisation schemes (how to quantise every projection) and schemes by name, for flags and
configs (each the inverse of its class's `name`).

Weight-only (QuantScheme):
  "dense" (or "none")            no quantisation
  "int8"                         int8 RTN, one scale per output channel
  "int4"                         int4 RTN, groups of 128
  "int{4,8}-{rtn,awq,gptq}[-g{N}|-pc][-asym][-act]"   e.g. "int4-awq-g128", "int4-gptq-g32-act"

Weights and activations in 8 bits (W8A8Scheme; per-channel weight scales unless "-pt"):
  "w8a8-int8-naive" (or "w8a8")          int8, activations per token (dynamic): the control
  "w8a8-int8-smooth[-a{alpha}]"          SmoothQuant first (or "w8a8-smooth[-a{alpha}]"); alpha,
                                         the migration strength in [0, 1], defaults to 0.5: e.g.
                                         "w8a8-int8-smooth-a0.8"
  "w8a8-fp8[-static][-pt]" (or "fp8[-static][-pt]")   FP8 e4m3; "-static": one calibrated
                                         activation scale per projection; "-pt": one weight scale per tensor
  any of these with dynamic activation scales + "-head"   the LM head too (tied or not), e.g.
                                         "w8a8-head": an 8-bit head beside the float embedding table

Simulated (SimScheme; fake-quant for accuracy studies, no memory or speed saving):
  "nvfp4-sim[-a8|-a4]", "mxfp4-sim[-a8|-a4]"   FP4 weights; activations 16-bit, FP8 per token
                                         ("-a8"), or the same FP4 format ("-a4")
  "w4a8-sim"                             int4 RTN g128 weights, FP8 per-token activations
  "w4a16-fp8scale-sim"                   int4 g32 weights with e4m3 group scales (under a float32
                                         scale per output channel), 16-bit activations

Weight-only names always pad input rows up to a whole group (QuantScheme(pad=True)), so a group
size works on every layer; a model whose dimensions divide the group is unaffected. The simulated
formats pad their blocks the same way.
"""

from __future__ import annotations

import dataclasses
import re

from jaxinfer.models import family as family_lib
from jaxinfer.models.formats import BITS
from jaxinfer.models.llama import LLAMA

# The projections a scheme quantises: a family's column and row params (the Llama-style families'
# below; a model's own: model.config.family.projections). Embeddings, norms, biases and the LM head
# stay dense.
LINEAR_WEIGHTS = LLAMA.projections
METHODS = ("rtn", "awq", "gptq")


def projections(layers: dict) -> list[str]:
    """The projections among a params pytree's layer params (by their role in the registered
    families), in the pytree's order."""
    return [name for name in layers if (p := family_lib.lookup_param(name)) is not None and p.layer
            and p.is_projection]


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How to quantise every projection of a model.

    bits: 4 or 8. group_size: input rows per scale (32/64/128), None for one scale per output
    channel. symmetric: implicit zero point 2**(bits-1); otherwise a stored zero per group.
    pad: zero-pad input rows up to a multiple of group_size (else such a layer is an error).
    method: rtn | awq | gptq. act_order: GPTQ's descending-Hessian-diagonal column order.
    scale_dtype: None keeps the weight dtype. experts: a mixture of experts' expert weights too
    (RTN, or AWQ / GPTQ on each expert's own routed tokens; the grouped matmul dequantises them),
    not the projections alone.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    pad: bool = False
    method: str = "rtn"
    act_order: bool = False
    scale_dtype: str | None = None
    experts: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not one of {BITS}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1 (or None for per-channel)")
        if self.bits == 4 and self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size={self.group_size}: 4-bit packing needs an even group_size")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order applies to method='gptq' only")

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "pc"
        sym = "" if self.symmetric else "-asym"
        order = "-act" if self.act_order else ""
        return f"int{self.bits}-{self.method}-{group}{sym}{order}" + ("-experts" if self.experts else "")


DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength when a name gives none
W8A8_DTYPES = ("int8", "fp8")
SIM_WEIGHTS = ("nvfp4", "mxfp4", "int4", "int4-fp8scale")


@dataclasses.dataclass(frozen=True)
class W8A8Scheme:
    """Weights and activations in 8 bits (jaxinfer.models.act_formats.W8A8Weight).

    dtype: "int8" or "fp8" (e4m3). smooth_alpha: SmoothQuant's migration strength in [0, 1] (int8
    only), None for none. static_act: one calibrated activation scale per projection (fp8 only),
    else one per token computed on the fly. per_tensor: one weight scale per matrix (fp8 only),
    else one per output channel.
    """

    dtype: str = "int8"
    smooth_alpha: float | None = None
    static_act: bool = False
    per_tensor: bool = False
    head: bool = False

    def __post_init__(self):
        if self.dtype not in W8A8_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {W8A8_DTYPES}")
        if self.smooth_alpha is not None and (self.dtype != "int8" or not 0.0 <= self.smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha={self.smooth_alpha} needs dtype='int8' and a value in [0, 1]")
        if (self.static_act or self.per_tensor) and self.dtype != "fp8":
            raise ValueError("static_act and per_tensor apply to dtype='fp8' only")
        if self.head and self.static_act:
            raise ValueError("head=True takes per-token activation scales (the head's input is not calibrated): "
                             "drop static_act")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha is not None or self.static_act

    @property
    def name(self) -> str:
        head = HEAD_SUFFIX if self.head else ""
        if self.dtype == "int8":
            base = "w8a8-int8-naive" if self.smooth_alpha is None else f"w8a8-int8-smooth-a{self.smooth_alpha:g}"
            return base + head
        return "w8a8-fp8" + ("-static" if self.static_act else "") + ("-pt" if self.per_tensor else "") + head


@dataclasses.dataclass(frozen=True)
class SimScheme:
    """A simulated format (jaxinfer.models.act_formats.SimWeight): weights rounded to `weights` (nvfp4,
    mxfp4, int4 RTN in groups of group_size, int4-fp8scale: int4 with e4m3 group scales), and
    activations rounded to `act` in every matmul (None, "fp8", "nvfp4", "mxfp4")."""

    weights: str = "nvfp4"
    act: str | None = None
    group_size: int = 32  # int4 formats only

    def __post_init__(self):
        if self.weights not in SIM_WEIGHTS:
            raise ValueError(f"weights={self.weights!r} is not one of {SIM_WEIGHTS}")
        if self.act not in (None, "fp8", "nvfp4", "mxfp4"):
            raise ValueError(f"act={self.act!r} is not one of None, 'fp8', 'nvfp4', 'mxfp4'")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size={self.group_size} must be even and >= 2")

    @property
    def name(self) -> str:
        if self.weights == "int4" and self.act == "fp8" and self.group_size == 128:
            return "w4a8-sim"
        if self.weights == "int4-fp8scale" and self.act is None and self.group_size == 32:
            return "w4a16-fp8scale-sim"
        if self.weights in ("nvfp4", "mxfp4") and self.act in (None, "fp8", self.weights):
            return f"{self.weights}-sim" + {None: "", "fp8": "-a8"}.get(self.act, "-a4")
        return f"sim:{self.weights}-g{self.group_size}-a{self.act}"  # no name parses to this


Scheme = QuantScheme | W8A8Scheme | SimScheme
DENSE = ("dense", "none")
_PATTERN = re.compile(r"int(?P<bits>\d+)(?:-(?P<method>rtn|awq|gptq))?(?:-(?P<group>g\d+|pc))?(?P<asym>-asym)?(?P<act>-act)?")
_W8A8 = re.compile(r"(?:w8a8-int8-naive|w8a8)|(?:w8a8-int8-smooth|w8a8-smooth)(?:-a(?P<alpha>\d*\.?\d+))?")
_FP8 = re.compile(r"(?:w8a8-fp8|fp8)(?P<static>-static)?(?P<pt>-pt)?")
_SIM = re.compile(r"(?P<fmt>nvfp4|mxfp4)-sim(?:-a(?P<abits>8|4))?")
_SIM_NAMED = {"w4a8-sim": SimScheme("int4", "fp8", 128), "w4a16-fp8scale-sim": SimScheme("int4-fp8scale", None, 32)}
NAMES_HELP = ("'dense', int{4,8}-{rtn,awq,gptq}[-g<N>|-pc][-asym][-act] (e.g. int8, int4-awq-g128), "
              "w8a8-int8-naive, w8a8-int8-smooth[-a<alpha>], w8a8-fp8[-static][-pt], "
              "{nvfp4,mxfp4}-sim[-a8|-a4], w4a8-sim or w4a16-fp8scale-sim; an int{4,8} RTN, AWQ or GPTQ name + '-experts' "
              "quantises a mixture of experts' experts too; a w8a8 name with per-token activations + '-head' the LM "
              "head too")


EXPERTS_SUFFIX = "-experts"
HEAD_SUFFIX = "-head"
# A name + suffix: its scheme (of this kind) with this field set.
SUFFIXES = {HEAD_SUFFIX: (W8A8Scheme, "head", "w8a8 schemes quantise the LM head"),
            EXPERTS_SUFFIX: (QuantScheme, "experts", "int4 / int8 weight-only schemes quantise the experts")}


def scheme_from_name(name: str) -> Scheme | None:
    """The scheme a name stands for (None for a dense model). Unknown names raise ValueError."""
    if name in DENSE:
        return None
    for suffix, (kind, field, what) in SUFFIXES.items():  # "w8a8-head", "int8-experts", "int4-g32-experts"
        if name.endswith(suffix):
            base = scheme_from_name(name.removesuffix(suffix))
            if not isinstance(base, kind):
                raise ValueError(f"weights={name!r}: only {what}")
            try:
                return dataclasses.replace(base, **{field: True})
            except ValueError as e:
                raise ValueError(f"weights={name!r}: {e}") from None
    try:
        if m := _W8A8.fullmatch(name):
            smooth = "smooth" in name
            alpha = float(m["alpha"]) if m["alpha"] else DEFAULT_ALPHA
            return W8A8Scheme("int8", smooth_alpha=alpha if smooth else None)
        if m := _FP8.fullmatch(name):
            return W8A8Scheme("fp8", static_act=bool(m["static"]), per_tensor=bool(m["pt"]))
        if m := _SIM.fullmatch(name):
            return SimScheme(m["fmt"], {None: None, "8": "fp8", "4": m["fmt"]}[m["abits"]])
        if name in _SIM_NAMED:
            return _SIM_NAMED[name]
        m = _PATTERN.fullmatch(name)
        if not m:
            raise ValueError(f"weights={name!r} is not {NAMES_HELP}")
        bits = int(m["bits"])
        if m["group"]:
            group = None if m["group"] == "pc" else int(m["group"][1:])
        else:
            group = None if bits == 8 else 128
        return QuantScheme(bits=bits, group_size=group, symmetric=not m["asym"], pad=True,
                           method=m["method"] or "rtn", act_order=bool(m["act"]))
    except ValueError as e:
        if str(e).startswith(f"weights={name!r}"):
            raise
        raise ValueError(f"weights={name!r}: {e}") from None
