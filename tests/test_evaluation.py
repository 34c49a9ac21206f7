"""The lm-eval backend (jaxinfer.evaluation.JaxInferLM) against lm-eval's own `hf` backend on the
same tiny model in HF transformers (float32): per-request loglikelihoods within 1e-3 and the same
accuracy on the shipped multiple-choice task, loglikelihood_rolling over several windows, greedy
generate_until with stop strings; the model arguments, the `jaxinfer` registration, and the
`jaxinfer-lm-eval` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'jaxinfer[eval]'")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import jaxinfer.evaluation as ev
from jaxinfer.checkpoints.weights import ASSETS_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "jaxinfer_arith_mc"
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
         "Pack my box with five dozen liquor jugs."]


@pytest.fixture(scope="module")
def hf_lm():
    """lm-eval's HF backend over the tiny checkpoint in transformers, float32, with its byte tokenizer."""
    path = os.path.join(ASSETS_DIR, "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>")
    return HFLM(pretrained=model, tokenizer=tok, batch_size=16, max_length=64, device="cpu")


@pytest.fixture(scope="module")
def jax_lm():
    return ev.JaxInferLM(model="tiny", max_length=64, max_batch=16)


def _requests(lm, kind):
    """The requests the shipped task makes of lm (lm-eval builds them: the reference's own prompts)."""
    task = TaskManager(include_path=ev.TASKS_DIR).load([TASK])["tasks"][TASK]
    task.build_all_requests(rank=0, world_size=1)
    return [r for r in task.instances if r.request_type == kind]


@pytest.mark.slow
def test_loglikelihoods_and_accuracy_equal_lm_eval_hf(hf_lm, jax_lm):
    requests = _requests(jax_lm, "loglikelihood")
    assert len(requests) == 160
    ours, ref = jax_lm.loglikelihood(requests), hf_lm.loglikelihood(requests)
    np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in ref], atol=1e-3, rtol=0)
    assert [g for _, g in ours] == [g for _, g in ref]
    tm = TaskManager(include_path=ev.TASKS_DIR)
    acc = {name: lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm)["results"][TASK]
           for name, lm in (("jaxinfer", jax_lm), ("hf", hf_lm))}
    for metric in ("acc,none", "acc_norm,none"):
        assert acc["jaxinfer"][metric] == acc["hf"][metric], acc


def test_loglikelihood_rolling_equals_lm_eval_hf(hf_lm, jax_lm):
    """Texts over several 64-token windows (the first is 135 bytes: three windows)."""
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    np.testing.assert_allclose(jax_lm.loglikelihood_rolling(requests), hf_lm.loglikelihood_rolling(requests),
                               atol=1e-3, rtol=0)


def test_greedy_generate_until_equals_lm_eval_hf(hf_lm, jax_lm):
    gen = [({"until": ["\n"], "max_gen_toks": 24, "do_sample": False}, "def f(x):\n    return"),
           ({"until": ["e"], "max_gen_toks": 16}, "The quick brown fox"),
           ({"max_gen_toks": 12, "temperature": 0.0}, "Question: What is 2 plus 2?\nAnswer:")]
    requests = [Instance("generate_until", {}, (ctx, kwargs), i) for i, (kwargs, ctx) in enumerate(gen)]
    ours, ref = jax_lm.generate_until(requests), hf_lm.generate_until(requests)
    assert ours == ref
    assert all("e" not in text for text in ours[1:2]) and all("\n" not in text for text in ours[:1])


def test_registered_and_model_args_reach_the_engine():
    assert get_model("jaxinfer") is ev.JaxInferLM
    lm = get_model("jaxinfer").create_from_arg_string(
        "model=tiny,kv_dtype=int8,max_batch=4,page_size=8,quant=int8,spec=ngram,spec_tokens=3",
        {"batch_size": 1, "device": "cuda:0"})
    config = lm.engine.config
    assert (config.kv_dtype, config.max_batch, config.page_size) == ("int8", 4, 8)
    assert (config.speculative.method, config.speculative.num_tokens) == ("ngram", 3)
    assert type(lm.model.params["layers"]["wq"]).__name__ == "QuantizedWeight"


@pytest.mark.parametrize("args, words", [
    ({"model": "tiny", "max_batchh": 4}, "max_batchh"),
    ({}, "model is required"),
    ({"model": "tiny", "quant": "int3-foo"}, "quant="),
    ({"model": "tiny", "spec": "magic"}, "spec="),
    ({"model": "tiny", "kv_dtype": "int4"}, "kv_dtype"),
    ({"model": "tiny", "adapter": "/no/such/dir"}, "adapter="),
    ({"model": "tiny", "dtype": "float64"}, "dtype="),
    ({"model": "tiny", "calib_sequences": 0}, "calib_sequences=0 must be an integer >= 1"),
])
def test_bad_model_args_are_refused_before_loading(args, words):
    with pytest.raises(ValueError, match=words):
        ev.check_options(args)


def test_bad_lm_eval_args_are_refused(jax_lm):
    with pytest.raises(ValueError, match="max_batch"):
        ev.JaxInferLM(model="tiny", batch_size=8)
    with pytest.raises(ValueError, match="max_length"):
        ev.JaxInferLM(model="tiny", max_length=10_000)
    bad = [Instance("generate_until", {}, ("x", {"until": ["\n"], "num_beams": 4}), 0)]
    with pytest.raises(ValueError, match="num_beams"):
        jax_lm.generate_until(bad)


@pytest.mark.slow
def test_command_line_runs_the_shipped_task(tmp_path):
    """`python -m jaxinfer.evaluation` (the jaxinfer-lm-eval script): lm-eval's CLI with `jaxinfer`."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "jaxinfer.evaluation", "--model", "jaxinfer", "--model_args", "model=tiny,max_batch=16",
           "--tasks", TASK, "--limit", "8", "--output_path", str(out)]
    run = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = list(out.rglob("results_*.json"))
    assert json.loads(result.read_text())["results"][TASK]["sample_len"] == 8


@pytest.mark.slow
def test_adapter_scores_equal_lm_eval_hf_on_the_peft_merged_model(tmp_path):
    """adapter=DIR runs through the engine's LoRA slots; the reference is lm-eval's HF backend on
    PEFT's own merge of the same adapter into the tiny model."""
    peft = pytest.importorskip("peft")
    path = os.path.join(ASSETS_DIR, "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_" in key:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "adapter")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>")
    ref = HFLM(pretrained=peft_model.merge_and_unload().eval(), tokenizer=tok, batch_size=8, max_length=64,
               device="cpu")
    ours = ev.JaxInferLM(model="tiny", adapter=str(tmp_path / "adapter"), max_length=64, max_batch=8)
    assert ours.engine.config.max_adapters == 1
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(requests), ref.loglikelihood_rolling(requests),
                               atol=1e-3, rtol=0)
    base = ev.JaxInferLM(model="tiny", max_length=64, max_batch=8).loglikelihood_rolling(requests)
    assert np.abs(np.subtract(base, ours.loglikelihood_rolling(requests))).max() > 0.1  # the adapter is applied
