"""Programs under a mesh: the trace-time side of jaxinfer.sharding (which re-exports these).

The mesh a program runs over is set for tracing with `use_mesh` (jax.set_mesh); the model code asks
`tp_mesh()` / `ep_mesh()` whether it is tracing for a tensor- or expert-parallel mesh, and runs a
kernel per shard (`per_shard`: a pallas_call is opaque to the partitioner) or the experts per ep
shard (`per_ep_shard`) under shard_map. This module imports nothing of the project, so the layers
(jaxinfer.models.moe, matmul, attention) can use it without importing the placement rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
from jax.sharding import Mesh


def use_mesh(mesh: Mesh | None):
    """A context that sets the mesh for tracing (`tp_mesh` reads it); a no-op for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _mesh_with(axis: str):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1 or axis in mesh.manual_axes:
        return None
    return mesh


def tp_mesh():
    """The mesh set for tracing when it has a "tp" axis of more than one device, else None."""
    return _mesh_with("tp")


def ep_mesh():
    """The mesh set for tracing when it has an "ep" axis of more than one device (and the trace is
    not already per ep shard), else None."""
    return _mesh_with("ep")


def per_shard(fn: Callable, in_specs, out_specs, **kwargs) -> Callable:
    """fn run on each device's shards under the tp mesh set for tracing (fn itself without one).
    Inside a per-ep-shard program (the MoE layer under ep) only the axes not yet per shard are."""
    mesh = tp_mesh()
    if mesh is None:
        return fn
    if mesh.manual_axes:
        kwargs["axis_names"] = set(mesh.axis_names) - set(mesh.manual_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False, **kwargs)


def per_ep_shard(fn: Callable, in_specs, out_specs) -> Callable:
    """fn run per ep shard under the ep mesh set for tracing: manual over "ep" only, the other axes
    left to the partitioner (tp inside stays as it is outside)."""
    return jax.shard_map(fn, mesh=ep_mesh(), in_specs=in_specs, out_specs=out_specs, axis_names={"ep"},
                         check_vma=False)
