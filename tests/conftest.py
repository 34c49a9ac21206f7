"""Shared test fixtures: deterministic seeds from test names, tolerance tables, HF model builders."""

from __future__ import annotations

import hashlib
import os

# Tests compare float32 results at 1e-5: keep matmuls at full precision on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Most of the suite's time is compiling small programs once each: compile without LLVM's costly
# optimisations (measured on the 2-core CPU: six engine test modules 265 s -> 180 s, results equal).
# Benchmark scripts run outside pytest keep XLA's defaults; flags already set (a device count) are kept.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import gc

import jax
import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test's name, so each test draws its own reproducible inputs."""
    return int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little")


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every module's compiled programs when it ends: one process runs the whole suite, and
    hundreds of test modules' executables would otherwise accumulate in JAX's caches."""
    yield
    jax.clear_caches()
    gc.collect()
