"""Weight-only quantisation as a transform on params: `quantize(params, scheme)` returns params
whose projection weights are QuantizedWeight pytrees; `model.py` reaches them through
`jaxinfer.matmul.linear`, its one matmul dispatch point.

Schemes: RTN (here), AWQ (awq.py) and GPTQ (gptq.py), the latter two from calibration
activations (calibration.py). Published AWQ/GPTQ checkpoints load onto the same pytree
(checkpoints.py).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.formats import QuantizedWeight, dequantize, reference_matmul
from jaxinfer.matmul import linear
from jaxinfer.model import Model
from jaxinfer.quant import awq, gptq
from jaxinfer.quant import calibration as calib
from jaxinfer.quant.rtn import quantize_weight
from jaxinfer.quant.spec import LINEAR_WEIGHTS, METHODS, QuantScheme, scheme_from_name


def quantize(params: dict, scheme: QuantScheme) -> dict:
    """RTN-quantise every projection in LINEAR_WEIGHTS (stacked over layers). AWQ and GPTQ need
    calibration data: use `quantize_model`."""
    if scheme.method != "rtn":
        raise ValueError(f"method={scheme.method!r} needs calibration data: use quantize_model")
    layers = dict(params["layers"])
    for name in LINEAR_WEIGHTS:
        layers[name] = quantize_weight(
            layers[name], scheme.bits, scheme.group_size, symmetric=scheme.symmetric, pad=scheme.pad,
            scale_dtype=scheme.scale_dtype, name=f"layers.{name}",
        )
    return {**params, "layers": layers}


def quantize_model(
    model: Model,
    scheme: QuantScheme,
    calibration: np.ndarray | None = None,  # (B, T) int32 token windows; None: calibration_windows(...)
    *,
    num_sequences: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> Model:
    """A new Model with every projection in LINEAR_WEIGHTS quantised by `scheme`.

    RTN needs no calibration. AWQ and GPTQ run the calibration windows through the model layer
    by layer (calibration.run_layers): each layer is calibrated on the inputs the layers below
    it produce once quantised. Without `calibration`, num_sequences windows of seq_len held-out
    tokens (in the model's own tokens) are drawn with `seed` (calibration.calibration_windows;
    defaults 256 x 256)."""
    for name in LINEAR_WEIGHTS:
        if isinstance(model.params["layers"][name], QuantizedWeight):
            raise ValueError(f"layers.{name} is already quantised: quantize_model takes a dense model")
    if scheme.method == "rtn":
        return dataclasses.replace(model, params=quantize(model.params, scheme))
    if calibration is None:
        calibration = calib.calibration_windows(model, num_sequences or calib.DEFAULT_NUM_SEQUENCES,
                                                seq_len or calib.DEFAULT_SEQ_LEN, seed)
    elif num_sequences is not None or seq_len is not None:
        raise ValueError("num_sequences and seq_len choose calibration windows: pass them or calibration, not both")
    quantize_layer = awq.quantize_layer if scheme.method == "awq" else gptq.quantize_layer
    run = calib.run_layers(model, calibration, lambda l, lp, stats: quantize_layer(model.config, lp, stats, scheme),
                           chunk_size=chunk_size or calib.DEFAULT_CHUNK_SIZE, progress=progress)
    return dataclasses.replace(model, params={**model.params, "layers": run.layers})


def quantize_by_name(model, name: str, **calibration):
    """The model with its weights quantised by the named scheme (the model itself for 'dense')."""
    scheme = scheme_from_name(name)
    if scheme is None:
        return model
    return quantize_model(model, scheme, **calibration)


def dequantize_params(params: dict, dtype=None) -> dict:
    """Params with every QuantizedWeight replaced by its dense dequantised weight: the reference
    model a quantised model's outputs are compared against."""
    dtype = dtype or params["embed"].dtype
    return jax.tree_util.tree_map(
        lambda x: dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x, params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )


__all__ = [
    "LINEAR_WEIGHTS",
    "METHODS",
    "QuantScheme",
    "QuantizedWeight",
    "dequantize",
    "dequantize_params",
    "linear",
    "quantize",
    "quantize_by_name",
    "quantize_model",
    "quantize_weight",
    "reference_matmul",
    "scheme_from_name",
]
