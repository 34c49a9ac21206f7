"""Task evaluation: the engine as an EleutherAI lm-evaluation-harness model (`jaxinfer`), its model
arguments, and the task data shipped under configs/tasks/. Needs lm-eval: pip install 'jaxinfer[eval]'.

  import jaxinfer.evaluation                      # registers the `jaxinfer` model with lm-eval
  lm = jaxinfer.evaluation.JaxInferLM(model="tiny", quant="int8", kv_dtype="int8")
  lm_eval.simple_evaluate(model=lm, tasks=["jaxinfer_arith_mc"],
                          task_manager=lm_eval.tasks.TaskManager(include_path=jaxinfer.evaluation.TASKS_DIR))

lm-eval's own command line finds a model only in its registry, which an outside package joins by
being imported; `python -m jaxinfer.evaluation` (the `jaxinfer-lm-eval` console script) is that
command line with `jaxinfer` registered and the shipped tasks included:
  jaxinfer-lm-eval --model jaxinfer --model_args model=tiny,kv_dtype=int8 --tasks jaxinfer_arith_mc
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("lm_eval") is None:
    raise ModuleNotFoundError("jaxinfer.evaluation needs lm-eval: pip install 'jaxinfer[eval]'", name="lm_eval")

from jaxinfer.evaluation.backend import JaxInferLM
from jaxinfer.evaluation.options import build, check_options
from jaxinfer.evaluation.tasks import TASKS_DIR

__all__ = ["TASKS_DIR", "JaxInferLM", "build", "check_options"]
