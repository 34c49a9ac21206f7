"""The shipped tiny models: they load offline, are as good as recorded, match HF transformers, and
the main job runs on them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import TOLERANCE, row_rel_error, run_main, run_script

import jaxinfer as ji
from experiments import eval_tiny, generate, train_tiny
from jaxinfer import data
from jaxinfer.checkpoints.weights import ASSETS_DIR


@pytest.fixture(scope="module")
def recorded():
    with open(os.path.join(ASSETS_DIR, "eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def target():
    return ji.load_model("tiny")


@pytest.fixture(scope="module")
def draft():
    return ji.load_model("tiny-draft")


@pytest.fixture(scope="module")
def windows(recorded, target):
    return data.heldout_windows(target, recorded["seq_len"], recorded["heldout_windows"])


def test_shipped_models_load(target, draft):
    for model, name in ((target, "tiny"), (draft, "tiny-draft")):
        with open(os.path.join(ASSETS_DIR, name, "training.json")) as f:
            training = json.load(f)
        assert model.config.num_params() == training["params"]
        assert isinstance(model.tokenizer, ji.HFTokenizer)
        assert model.tokenizer.encode("hi") == ji.ByteTokenizer().encode("hi")
    assert 5 <= target.config.num_params() / draft.config.num_params() <= 10
    assert target.config.vocab_size == draft.config.vocab_size


# The shipped weights are fixed files: re-deriving their recorded evaluation guards the evaluation
# code, which test_eval_and_training_scripts_run runs on every pass; the full check is slow-marked.
@pytest.mark.slow
def test_heldout_bits_per_byte_as_recorded(target, draft, windows, recorded):
    bpb_target = data.bits_per_byte(target, windows)
    bpb_draft = data.bits_per_byte(draft, windows)
    assert abs(bpb_target - recorded["target"]["heldout_bits_per_byte"]) < 0.02
    assert abs(bpb_draft - recorded["draft"]["heldout_bits_per_byte"]) < 0.02
    assert bpb_target < bpb_draft < 8.0  # a trained model: far below a uniform byte model


@pytest.mark.slow
def test_greedy_agreement_as_recorded(target, draft, windows, recorded):
    agreement = data.greedy_agreement(target, draft, windows)
    assert abs(agreement - recorded["greedy_agreement"]) < 0.01
    assert 0.3 < agreement < 1.0


def test_hf_transformers_reads_the_shipped_model(target, rng):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS_DIR, "tiny"), torch_dtype=torch.float32)
    hf.eval()
    prompt = target.tokenizer.encode("def fibonacci(n):")
    tokens = np.array([prompt])
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
        gen = hf.generate(torch.from_numpy(tokens), max_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones_like(torch.from_numpy(tokens)))
    assert row_rel_error(ji.forward_logits(target, tokens), ref) <= TOLERANCE["float32"]
    sp = ji.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert ji.generate(target, [prompt], sp)[0].token_ids == gen[0, len(prompt):].tolist()


def test_engine_equals_baseline_on_the_shipped_model(target):
    prompts = ["def fibonacci(n):", "import os\n", "The", "class Queue:\n    def"]
    sp = ji.SamplingParams(max_tokens=24, temperature=0.0)
    ref = [o.token_ids for o in ji.generate(target, prompts, sp)]
    for config in (ji.EngineConfig(page_size=8, max_tokens_per_step=16),
                   ji.EngineConfig(batching="static", max_batch=2, num_pages=9, page_size=8)):
        assert [o.token_ids for o in ji.Engine(target, config).generate(prompts, sp)] == ref


def test_main_job_runs():
    result = run_script("experiments.generate", "--prompt=def add(a, b):", "--max_tokens=12", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def add(a, b):")
    for field in ("TTFT", "tokens/s", "M params", "compile"):
        assert field in result.stdout
    bad = run_script("experiments.generate", "--model=no-such-model", timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "error: model 'no-such-model' is neither a directory nor a shipped model")


def test_main_job_streams(target, capsys, tmp_path):
    """--stream prints the completion through Engine.stream: the same text as the engine's, then the
    report; it serves one prompt through the engine only."""
    run_main(generate, "--stream", "--prompt=def add(a, b):", "--max_tokens=12", "--temperature=0")
    out = capsys.readouterr().out
    (ref,) = ji.Engine(target).generate(["def add(a, b):"], ji.SamplingParams(max_tokens=12, temperature=0.0))
    assert out.startswith("def add(a, b):" + ref.text + "\n" + "-" * 72) and "TTFT" in out
    with pytest.raises(ValueError, match="--stream serves through the engine"):
        run_main(generate, "--stream", "--baseline")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nimport sys\n")
    with pytest.raises(ValueError, match="--stream serves one prompt; --prompts_file=.* has 2"):
        run_main(generate, "--stream", f"--prompts_file={prompts}")


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--prompt=", "--prompt is empty"),
        ("--max_tokens=0", "max_tokens must be an integer >= 1"),
        ("--temperature=-1", "temperature must be >= 0"),
        ("--top_p=0", "top_p must be in \\(0, 1\\]"),
        ("--top_p=1.5", "top_p must be in \\(0, 1\\]"),
        ("--chat", "--chat needs a model with a chat template; tiny has none"),
    ],
)
def test_main_job_bad_input_is_refused(flag, message):
    with pytest.raises(ValueError, match=message):
        run_main(generate, flag)


@pytest.mark.slow  # 2.7 s: the scripts' flags; the main job stays fast
def test_eval_and_training_scripts_run(tmp_path, capsys):
    """eval_tiny prints its table (and writes only when asked); train_tiny trains, exports and
    evaluates a model (two steps of the draft here)."""
    run_main(eval_tiny, "--windows=2", "--seq_len=64")
    assert "greedy agreement" in capsys.readouterr().out
    run_main(train_tiny, "--which=draft", "--steps=2", "--batch_size=2", "--seq_len=64", "--eval_windows=2",
             f"--out_dir={tmp_path}", f"--ckpt_dir={tmp_path / 'ckpt'}")
    record = json.loads((tmp_path / "tiny-draft" / "training.json").read_text())
    assert record["steps"] == 2 and record["heldout_bits_per_byte"] > 0
    assert ji.load_model(str(tmp_path / "tiny-draft")).config.max_position_embeddings == 64
