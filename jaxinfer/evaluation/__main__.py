"""lm-eval's command line with the `jaxinfer` model registered and the shipped tasks included
(configs/tasks/ as --include_path, unless one is given):

  python -m jaxinfer.evaluation --model jaxinfer --model_args model=tiny --tasks jaxinfer_arith_mc
  jaxinfer-lm-eval ...   (the same, as a console script)
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

from jaxinfer.evaluation import TASKS_DIR


def with_tasks(argv: list[str]) -> list[str]:
    """argv with TASKS_DIR in --include_path (lm-eval's `run` subcommand takes one path)."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--include_path" and i + 1 < len(args):
            return args
        if arg.startswith("--include_path="):
            return args
    return args + ["--include_path", TASKS_DIR]


def cli() -> None:
    """The `jaxinfer-lm-eval` console script."""
    sys.argv = [sys.argv[0], *with_tasks(sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    cli()
