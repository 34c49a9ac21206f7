"""The task data shipped under configs/tasks/ (lm-eval task YAML over local JSONL files).

A task YAML there reads its data through `custom_dataset: !function jaxinfer.evaluation.tasks.local_json`
with `dataset_kwargs: {data_files: {split: FILE}}`: the files are found beside the YAML in
configs/tasks/ (in a checkout and in an installed wheel alike), and loaded by the `json` builder of
HF datasets (what `dataset_path: json` names), so nothing is downloaded at run time.

  lm_eval ... --include_path "$(python -c 'import jaxinfer.evaluation as e; print(e.TASKS_DIR)')" --tasks jaxinfer_arith_mc
"""

from __future__ import annotations

import os

import datasets

from jaxinfer import memory

TASKS_DIR = os.path.join(memory.CONFIGS_DIR, "tasks")


def local_json(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    """The splits of a shipped task: each JSON / JSONL file of data_files, named relative to
    configs/tasks/ (lm-eval passes the task's metadata too; it does not choose the data)."""
    paths = {}
    for split, name in data_files.items():
        path = os.path.join(TASKS_DIR, name)
        if not os.path.isfile(path):
            raise ValueError(f"data_files[{split!r}]={name!r}: no such file in {TASKS_DIR}")
        paths[split] = path
    return datasets.load_dataset("json", data_files=paths)
