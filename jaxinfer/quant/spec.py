"""QuantScheme (how to quantise every projection) and schemes by name, for flags and configs
(the inverse of QuantScheme.name).

  "dense" (or "none")            no quantisation
  "int8"                         int8 RTN, one scale per output channel
  "int4"                         int4 RTN, groups of 128
  "int{4,8}-{rtn,awq,gptq}[-g{N}|-pc][-asym][-act]"   e.g. "int4-awq-g128", "int4-gptq-g32-act"

Names always pad input rows up to a whole group (QuantScheme(pad=True)), so a group size works
on every layer; a model whose dimensions divide the group is unaffected.
"""

from __future__ import annotations

import dataclasses
import re

from jaxinfer.formats import BITS

# The projections a weight-only scheme quantises. Embeddings, norms, biases and the LM head stay dense.
LINEAR_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
METHODS = ("rtn", "awq", "gptq")


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How to quantise every projection of a model.

    bits: 4 or 8. group_size: input rows per scale (32/64/128), None for one scale per output
    channel. symmetric: implicit zero point 2**(bits-1); otherwise a stored zero per group.
    pad: zero-pad input rows up to a multiple of group_size (else such a layer is an error).
    method: rtn | awq | gptq. act_order: GPTQ's descending-Hessian-diagonal column order.
    scale_dtype: None keeps the weight dtype.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    pad: bool = False
    method: str = "rtn"
    act_order: bool = False
    scale_dtype: str | None = None

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not one of {BITS}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1 (or None for per-channel)")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order applies to method='gptq' only")

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "pc"
        sym = "" if self.symmetric else "-asym"
        order = "-act" if self.act_order else ""
        return f"int{self.bits}-{self.method}-{group}{sym}{order}"


DENSE = ("dense", "none")
_PATTERN = re.compile(r"int(?P<bits>\d+)(?:-(?P<method>rtn|awq|gptq))?(?:-(?P<group>g\d+|pc))?(?P<asym>-asym)?(?P<act>-act)?")


def scheme_from_name(name: str) -> QuantScheme | None:
    """The QuantScheme a name stands for (None for a dense model). Unknown names raise ValueError."""
    if name in DENSE:
        return None
    m = _PATTERN.fullmatch(name)
    if not m:
        raise ValueError(
            f"weights={name!r} is not 'dense' or int{{4,8}}-{{rtn,awq,gptq}}[-g<N>|-pc][-asym][-act] "
            "(e.g. int8, int4-awq-g128)"
        )
    bits = int(m["bits"])
    if m["group"]:
        group = None if m["group"] == "pc" else int(m["group"][1:])
    else:
        group = None if bits == 8 else 128
    try:
        return QuantScheme(bits=bits, group_size=group, symmetric=not m["asym"], pad=True,
                           method=m["method"] or "rtn", act_order=bool(m["act"]))
    except ValueError as e:
        raise ValueError(f"weights={name!r}: {e}") from None
