"""Weight schemes by name, for flags and configs: the inverse of QuantScheme.name.

  "dense" (or "none")            no quantisation
  "int8"                         int8 RTN, one scale per output channel
  "int4"                         int4 RTN, groups of 128
  "int{4,8}-{rtn,awq,gptq}[-g{N}|-pc][-asym][-act]"   e.g. "int4-awq-g128", "int4-gptq-g32-act"

Names always pad input rows up to a whole group (QuantScheme(pad=True)), so a group size works
on every layer; a model whose dimensions divide the group is unaffected.
"""

from __future__ import annotations

import re

from jaxinfer.quant import QuantScheme

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


def quantize_by_name(model, name: str, **calibration):
    """The model with its weights quantised by the named scheme (the model itself for 'dense')."""
    scheme = scheme_from_name(name)
    if scheme is None:
        return model
    from jaxinfer.quant import quantize_model

    return quantize_model(model, scheme, **calibration)
