"""GPTQ: quantise a weight one input row at a time, pushing each row's rounding error onto the
rows not yet quantised (Frantar et al. 2022, arXiv:2210.17323).

For y = x @ W with W: (K, N), GPTQ minimises ||X W - X Q||^2 over the calibration inputs X. With
H = 2 X^T X / n and U the upper Cholesky factor of H^-1 (H^-1 = U^T U), row i is rounded to q_i
and its error e_i = (w_i - q_i) / U[i, i] is subtracted from the rows after it as U[i, j] e_i
(the optimal compensation given the rows before i are fixed). The paper's "columns" are our input
rows K: our weights are stored (in, out).

  dampening    H += percdamp * mean(diag H) * I, so H^-1 exists
  dead rows    an input that is zero on every calibration token (diag H = 0) gets H[i, i] = 1 and
               w_i = 0; the pad rows of pad=True are such rows
  lazy batches rows go in blocks of `block_size`; inside a block the updates touch the block
               only, and the rows after it get the block's errors in one matmul at its end
  groups       a group's scale and zero point are computed (rtn.group_params) from the rows as
               they stand when its first row is reached, i.e. with the earlier errors applied
  act_order    rows are taken in descending diag(H) (most active inputs first); groups are then
               consecutive in that order, and the QuantizedWeight stores the rows in it, with
               perm[i] = the input row at stored row i (pad rows stay last)

Runs in numpy float64 on the host; the group parameters use the same jnp code as RTN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import MXFP4Weight, QuantizedWeight, check_scheme
from jaxinfer.quant import rtn
from jaxinfer.quant.calibration import EXPERT_SITES, LayerInputs, Params
from jaxinfer.quant.spec import QuantScheme

PERCDAMP = 0.01
BLOCK_SIZE = 128

_group_params = jax.jit(rtn.group_params, static_argnums=(1, 2, 3))


def inverse_hessian_factor(hessian: np.ndarray, percdamp: float = PERCDAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U (K, K) float64, the upper Cholesky factor of the dampened H^-1 (dead rows made
    identity first); dead (K,) bool, the rows with diag(H) == 0."""
    H = np.array(hessian, np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"hessian must be square (K, K), got shape {H.shape}")
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp} must be >= 0")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.diag(H))
    try:
        Linv = np.tril(np.linalg.inv(np.linalg.cholesky(H)))  # H = L L^T, so H^-1 = Linv^T Linv
        return np.linalg.cholesky(Linv.T @ Linv).T, dead
    except np.linalg.LinAlgError as e:
        raise ValueError(f"hessian is not positive definite after percdamp={percdamp} dampening") from e


def gptq_quantize(
    w: jax.Array,  # (K, N)
    hessian: np.ndarray,  # (K, K): 2 X^T X / n of the calibration inputs
    bits: int,
    group_size: int | None = None,  # None: one scale per output channel
    *,
    symmetric: bool = True,
    pad: bool = False,
    act_order: bool = False,
    percdamp: float = PERCDAMP,
    block_size: int = BLOCK_SIZE,
    scale_dtype=None,  # default: w.dtype
    name: str = "weight",
) -> QuantizedWeight:
    """GPTQ-quantise one projection given the Hessian of its inputs (see the module docstring)."""
    K, N = w.shape
    if np.shape(hessian) != (K, K):
        raise ValueError(f"{name}: hessian has shape {np.shape(hessian)}, the weight needs ({K}, {K})")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    scale_dtype = jnp.dtype(scale_dtype or w.dtype).name
    g = group_size or K
    Kp = K + (-K % g if pad and group_size else 0)
    check_scheme(bits, g, Kp, name)

    W = np.zeros((Kp, N), np.float64)
    W[:K] = np.asarray(w, np.float64)
    H = np.zeros((Kp, Kp), np.float64)  # pad rows: zero inputs, so dead rows of H
    H[:K, :K] = hessian
    order = np.arange(Kp)
    if act_order:
        diag = np.where(np.diag(H)[:K] == 0, 1.0, np.diag(H)[:K])  # dead rows rank as H[i, i] = 1
        order[:K] = np.argsort(-diag, kind="stable")
        W, H = W[order], H[np.ix_(order, order)]
    U, dead = inverse_hessian_factor(H, percdamp)
    W[dead] = 0.0

    qmax = 2**bits - 1
    Q = np.zeros((Kp, N), np.float64)  # integer values, stored row order
    scales = np.zeros((Kp // g, N), np.float64)
    zeros = np.zeros((Kp // g, N), np.float64)
    for b0 in range(0, Kp, block_size):
        b1 = min(b0 + block_size, Kp)
        errors = np.zeros((b1 - b0, N), np.float64)  # (rows in block, N)
        for i in range(b0, b1):
            if i % g == 0:
                s, z = _group_params(jnp.asarray(W[i : i + g], jnp.float32), bits, symmetric, scale_dtype)
                scales[i // g], zeros[i // g] = np.asarray(s), np.asarray(z)
            scale, zero = scales[i // g], zeros[i // g]  # (N,)
            q = np.clip(np.round(W[i] / scale) + zero, 0, qmax)
            Q[i] = q
            e = (W[i] - (q - zero) * scale) / U[i, i]  # (N,)
            W[i + 1 : b1] -= np.outer(U[i, i + 1 : b1], e)
            errors[i - b0] = e
        W[b1:] -= U[b0:b1, b1:].T @ errors
    perm = jnp.asarray(order[:K], jnp.int32) if act_order else None
    return rtn.from_integers(jnp.asarray(Q, jnp.float32), jnp.asarray(scales, jnp.float32),
                             jnp.asarray(zeros, jnp.float32), bits=bits, group_size=g, in_features=K,
                             symmetric=symmetric, scale_dtype=scale_dtype, perm=perm)


def split_columns(w: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """A QuantizedWeight (K, sum(sizes)) cut into weights of those many output columns."""
    if sum(sizes) != w.out_features:
        raise ValueError(f"sizes sum to {sum(sizes)}, the weight has out_features={w.out_features}")
    bounds = np.cumsum([0, *sizes])

    def cut(a, lo, hi):
        return None if a is None else a[..., lo:hi]

    return [dataclasses.replace(w, qweight=cut(w.qweight, lo, hi), scales=cut(w.scales, lo, hi),
                                zeros=cut(w.zeros, lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _gptq_shared(names: list[str], weights: list[jax.Array], hessian: np.ndarray, scheme: QuantScheme,
                 ) -> list[QuantizedWeight]:
    """GPTQ of weights that read the same input, as one weight with their columns side by side."""
    qw = gptq_quantize(jnp.concatenate(weights, axis=1), hessian, scheme.bits, scheme.group_size,
                       symmetric=scheme.symmetric, pad=scheme.pad, act_order=scheme.act_order,
                       scale_dtype=scheme.scale_dtype, name="layers." + "/".join(names))
    return split_columns(qw, [w.shape[1] for w in weights])


def quantize_layer(cfg: ModelConfig, lp: Params, stats: LayerInputs, scheme: QuantScheme) -> Params:
    """GPTQ every projection of one decoder layer from its input statistics. Projections that share
    an input (the family's sites: wq, wk, wv; w_gate, w_up) run as one weight with their columns side
    by side, which is the same computation (GPTQ treats output columns independently) with one
    factorisation. With scheme.experts, each expert's weights likewise, on the Hessian of the rows
    routed to that expert (stats.experts; the identity for an expert no calibration token reached),
    stacked back into one QuantizedWeight (E, ...) per expert weight."""
    lp = dict(lp)
    for site in cfg.family.sites:
        names = [n for n in cfg.family.site_projections(site.name) if n in lp]
        lp.update(zip(names, _gptq_shared(names, [lp[n] for n in names], stats.sites[site.name].hessian(), scheme)))
    if not scheme.experts:
        return lp
    for role, site in EXPERT_SITES.items():
        names = [n for n in lp if family_lib.parallel_style(n) == role and not isinstance(lp[n], MXFP4Weight)]
        if not names:
            continue
        per_expert = []
        for e in range(cfg.num_experts):
            expert_stats = jax.tree.map(lambda a, e=e: a[e], stats.experts[site])
            per_expert.append(_gptq_shared([f"{n}[{e}]" for n in names], [lp[n][e] for n in names],
                                           expert_stats.hessian(), scheme))
        for i, n in enumerate(names):
            lp[n] = jax.tree.map(lambda *a: jnp.stack(a), *[q[i] for q in per_expert])
    return lp
