"""Shared test fixtures: deterministic seeds from test names, tolerance tables, HF model builders."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

# Tests compare float32 results at 1e-5: keep matmuls at full precision on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Nearly all of the suite's time is XLA compiling small programs once each (measured: 88% of
# test_engine.py). Compile them without LLVM's costly passes and with XLA's classic CPU fusion
# emitters rather than its MLIR ones (on the 2-core CPU: test_engine.py 103 -> about 50 s, results
# equal). Benchmark scripts run outside pytest keep XLA's defaults; flags already set are kept. An
# XLA that does not know a flag aborts the process, so the flags are probed once in a subprocess.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = "import jax; jax.devices('cpu')"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _flags = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
    if _xla_accepts(_flags):
        os.environ["XLA_FLAGS"] = _flags

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


@pytest.fixture(scope="module")
def tiny():
    """The shipped tiny model (float32)."""
    import jaxinfer as ji

    return ji.load_model("tiny")


@pytest.fixture(scope="module")
def hf_tiny():
    """The same checkpoint in HF transformers (float32, eval mode): the reference."""
    import torch
    import transformers

    from jaxinfer.checkpoints.weights import ASSETS_DIR

    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS_DIR, "tiny"), dtype=torch.float32)
    return model.eval()
