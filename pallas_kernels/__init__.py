"""Pallas GPU kernels (Triton backend), each with a pure-jnp reference of the same signature.

One op per module, imported from it: `from pallas_kernels.flash_attention import flash_attention`.
(Nothing is re-exported here: a function named like its module would shadow the module.)
Every op also runs on the CPU with `interpret=True`; tests compare it with its reference there.
"""
