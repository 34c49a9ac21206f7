"""Quantisation as a transform on params: `quantize(params, scheme)` returns params whose
projection weights are packed pytrees (QuantizedWeight, W8A8Weight, SimWeight); `model.py` reaches
them through `jaxinfer.models.matmul.linear`, its one matmul dispatch point.

Schemes (spec.py names them): weight-only RTN (here), AWQ (awq.py) and GPTQ (gptq.py); W8A8 int8
(naive, or SmoothQuant) and FP8 (w8a8.py); simulated NVFP4, MXFP4, W4A8 and W4A16 with FP8
scales (simulated.py). AWQ, GPTQ, SmoothQuant and static FP8 read calibration activations
(calibration.py). Published AWQ/GPTQ checkpoints load onto the QuantizedWeight pytree
(checkpoints.py). Quantisation-aware training: qat.py.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.checkpoints.model import Model
from jaxinfer.models import family as family_lib
from jaxinfer.models.act_formats import SimWeight, W8A8Weight
from jaxinfer.models.formats import (
    MXFP4Weight,
    QuantizedWeight,
    dense_weight,
    dequantize,
    reference_matmul,
)
from jaxinfer.models.matmul import linear
from jaxinfer.quant import awq, gptq, simulated, spec, w8a8
from jaxinfer.quant import calibration as calib
from jaxinfer.quant.rtn import quantize_weight
from jaxinfer.quant.spec import (
    LINEAR_WEIGHTS,
    METHODS,
    QuantScheme,
    Scheme,
    SimScheme,
    W8A8Scheme,
    projections,
    scheme_from_name,
)

PACKED = (QuantizedWeight, W8A8Weight, SimWeight)


def needs_calibration(scheme: Scheme) -> bool:
    """Whether quantising by `scheme` reads calibration activations (AWQ, GPTQ, SmoothQuant, static FP8)."""
    if isinstance(scheme, QuantScheme):
        return scheme.method != "rtn"
    return isinstance(scheme, W8A8Scheme) and scheme.needs_calibration


def quantize(params: dict, scheme: Scheme) -> dict:
    """Quantise every projection (the layer params whose family role is column or row, stacked over
    layers) by a scheme that needs no calibration: RTN, naive W8A8, FP8 with dynamic activation
    scales, the simulated formats. The others (AWQ, GPTQ, SmoothQuant, static FP8) need calibration
    data: use `quantize_model`."""
    if needs_calibration(scheme):
        raise ValueError(f"scheme {scheme.name} needs calibration data: use quantize_model")
    if isinstance(scheme, W8A8Scheme):
        return w8a8.quantize_params(params, scheme)
    if isinstance(scheme, SimScheme):
        return simulated.quantize_params(params, scheme)
    layers = dict(params["layers"])
    experts = [n for n in layers if scheme.experts and family_lib.parallel_style(n) in family_lib.EXPERT_ROLES
               and not isinstance(layers[n], MXFP4Weight)]
    for name in projections(layers) + experts:  # experts: (L, E, K, N), one QuantizedWeight, leading axes kept
        layers[name] = quantize_weight(
            layers[name], scheme.bits, scheme.group_size, symmetric=scheme.symmetric, pad=scheme.pad,
            scale_dtype=scheme.scale_dtype, name=f"layers.{name}",
        )
    return {**params, "layers": layers}


def quantize_model(
    model: Model,
    scheme: Scheme,
    calibration: np.ndarray | None = None,  # (B, T) int32 token windows; None: calibration_windows(...)
    *,
    num_sequences: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> Model:
    """A new Model with every projection of its family quantised by `scheme`.

    RTN, naive W8A8, dynamic FP8 and the simulated formats need no calibration. AWQ, GPTQ,
    SmoothQuant and static FP8 run the calibration windows through the model layer by layer
    (calibration.run_layers): each layer is calibrated on the inputs the layers below it produce
    once quantised. Without `calibration`, num_sequences windows of seq_len held-out
    tokens (in the model's own tokens) are drawn with `seed` (calibration.calibration_windows;
    defaults 256 x 256)."""
    for name in projections(model.params["layers"]):
        if isinstance(model.params["layers"][name], PACKED):
            raise ValueError(f"layers.{name} is already quantised: quantize_model takes a dense model")
    if not needs_calibration(scheme):
        return dataclasses.replace(model, params=quantize(model.params, scheme))
    if calibration is None:
        calibration = calib.calibration_windows(model, num_sequences or calib.DEFAULT_NUM_SEQUENCES,
                                                seq_len or calib.DEFAULT_SEQ_LEN, seed)
    elif num_sequences is not None or seq_len is not None:
        raise ValueError("num_sequences and seq_len choose calibration windows: pass them or calibration, not both")
    if isinstance(scheme, W8A8Scheme):
        quantize_layer = w8a8.quantize_layer
    else:
        quantize_layer = awq.quantize_layer if scheme.method == "awq" else gptq.quantize_layer
    experts = isinstance(scheme, QuantScheme) and scheme.experts  # GPTQ's experts: each on its routed tokens
    run = calib.run_layers(model, calibration, lambda l, lp, stats: quantize_layer(model.config, lp, stats, scheme),
                           chunk_size=chunk_size or calib.DEFAULT_CHUNK_SIZE, progress=progress, experts=experts)
    params = {**model.params, "layers": run.layers}
    if isinstance(scheme, W8A8Scheme):
        params = w8a8.quantize_head(params, scheme)
    return dataclasses.replace(model, params=params)


def quantize_by_name(model, name: str, **calibration):
    """The model with its weights quantised by the named scheme (the model itself for 'dense')."""
    scheme = scheme_from_name(name)
    if scheme is None:
        return model
    return quantize_model(model, scheme, **calibration)


def smooth_model(model: Model, alpha: float = spec.DEFAULT_ALPHA, calibration: np.ndarray | None = None, *,
                 num_sequences: int | None = None, seq_len: int | None = None, seed: int = 0,
                 progress: bool = True) -> Model:
    """The float model with SmoothQuant's factors folded in and nothing quantised: the same function
    (up to float rounding), its activation ranges moved into the weights (w8a8.smooth_layer)."""
    if calibration is None:
        calibration = calib.calibration_windows(model, num_sequences or calib.DEFAULT_NUM_SEQUENCES,
                                                seq_len or calib.DEFAULT_SEQ_LEN, seed)
    smooth = lambda l, lp, stats: w8a8.smooth_layer(model.config, lp, stats, alpha)[0]  # noqa: E731
    run = calib.run_layers(model, calibration, smooth, progress=progress)
    return dataclasses.replace(model, params={**model.params, "layers": run.layers})


def dequantize_params(params: dict, dtype=None) -> dict:
    """Params with every packed weight replaced by its dense dequantised weight: the reference
    model a weight-only quantised model's outputs are compared against (W8A8 and simulated weights
    lose their activation rounding)."""
    dtype = dtype or params["embed"].dtype
    return jax.tree_util.tree_map(lambda x: dense_weight(x, dtype), params,
                                  is_leaf=lambda x: isinstance(x, (*PACKED, MXFP4Weight)))


__all__ = [
    "LINEAR_WEIGHTS",
    "METHODS",
    "PACKED",
    "QuantScheme",
    "QuantizedWeight",
    "SimScheme",
    "SimWeight",
    "W8A8Scheme",
    "W8A8Weight",
    "dequantize",
    "dequantize_params",
    "linear",
    "needs_calibration",
    "quantize",
    "quantize_by_name",
    "quantize_model",
    "quantize_weight",
    "reference_matmul",
    "scheme_from_name",
    "smooth_model",
]
