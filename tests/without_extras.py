"""Run experiments as `python -m MODULE ARGS...` runs them, where the optional extras cannot be
imported (their names are None in sys.modules: `import torch` raises ModuleNotFoundError and
importlib.util.find_spec("torch") is None, as when the package is not installed).

One interpreter imports the shared heavy modules once (jax, jaxinfer, experiments.common: what
every experiment imports first) and forks a child per command line, which runs the module as
__main__ with its arguments; so a table of command lines costs one interpreter start, not one
each. Nothing has touched a device before the fork.

  python tests/without_extras.py < cases.json    # [[module, [args...]], ...] -> [{rc, stdout, stderr}, ...]

rc is the child's exit status (None: it ran past the time limit and was killed).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import time
import traceback

# The modules of the optional extras (pyproject.toml), and the peers they bring.
BLOCKED = ("torch", "transformers", "peft", "accelerate", "httpx", "aiohttp", "fastapi", "uvicorn", "starlette", "matplotlib",
           "ray", "llama_cpp", "openai", "lm_eval")
TIMEOUT_S = 120


def child(module: str, args: list[str]) -> int:
    """In the forked child: run the module as __main__; its exit status."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"), as the interpreter reports it
        return 1
    except BaseException:  # noqa: BLE001  (reported as the interpreter would: a traceback, status 1)
        traceback.print_exc()
        return 1


def run_case(module: str, args: list[str]) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = 1
            try:
                code = child(module, args)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = None
                break
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def main() -> None:
    cases = json.load(sys.stdin)
    for name in BLOCKED:
        sys.modules[name] = None
    sys.path[0] = os.getcwd()  # the repository root, as `python -m` from it
    import experiments.common  # noqa: F401, PLC0415  (jax, jaxinfer and the shared flags, once)

    results = [run_case(module, args) for module, args in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
