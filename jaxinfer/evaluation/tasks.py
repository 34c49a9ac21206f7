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


# The pydoc cloze task ----------------------------------------------------------------------------
# Real English text the project can ship: the prose paragraphs of the Python documentation that
# every Python installation carries (pydoc_data.topics, PSF licence). Each question is a paragraph's
# opening words and four endings of the same length: its own next words and the next words of
# three other paragraphs of the documentation, a HellaSwag-style "which ending is the real one".
CLOZE_CONTEXT_WORDS = (16, 40)  # the context's length in words (drawn in this range, within the paragraph)
CLOZE_PARAGRAPH_WORDS = 32  # the shortest paragraph a question is drawn from
CLOZE_ENDING_WORDS = 8


def _prose_paragraphs() -> list[tuple[str, list[str]]]:
    """(topic, words) of every prose paragraph of pydoc_data.topics: unindented lines only (no code,
    no grammar), of CLOZE_PARAGRAPH_WORDS words at least, in topic order."""
    from pydoc_data import topics

    paragraphs = []
    for name, text in sorted(topics.topics.items()):
        for block in text.split("\n\n"):
            lines = block.split("\n")
            if any(not line or line[0].isspace() for line in lines) or "::=" in block or ">>>" in block:
                continue
            words = block.split()
            if len(words) >= CLOZE_PARAGRAPH_WORDS:
                paragraphs.append((name, words))
    return paragraphs


def pydoc_cloze(num: int, seed: int = 27) -> list[dict]:
    """num questions (as configs/tasks/pydoc_cloze.jsonl holds them): {"context", "endings" (4),
    "label" (the real ending's index), "topic"}, one per paragraph, drawn with random.Random(seed).
    The three other endings come from other paragraphs, each at a random position."""
    import random

    rng = random.Random(seed)
    paragraphs = _prose_paragraphs()
    if num > len(paragraphs):
        raise ValueError(f"num={num}: the documentation has only {len(paragraphs)} prose paragraphs")
    chosen = rng.sample(range(len(paragraphs)), num)
    questions = []
    for i in chosen:
        topic, words = paragraphs[i]
        k = rng.randint(CLOZE_CONTEXT_WORDS[0], min(CLOZE_CONTEXT_WORDS[1], len(words) - CLOZE_ENDING_WORDS))
        ending = " ".join(words[k : k + CLOZE_ENDING_WORDS])
        endings = [ending]
        while len(endings) < 4:
            j = rng.randrange(len(paragraphs))
            other = paragraphs[j][1]
            start = rng.randrange(len(other) - CLOZE_ENDING_WORDS + 1)
            candidate = " ".join(other[start : start + CLOZE_ENDING_WORDS])
            if j != i and candidate not in endings:
                endings.append(candidate)
        rng.shuffle(endings)
        questions.append({"context": " ".join(words[:k]), "endings": endings, "label": endings.index(ending),
                          "topic": topic})
    return questions
