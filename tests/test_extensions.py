"""Extensions made outside the library, with no edit to it: each section defines its extension here
and runs it through the public entry points.

Model family (test_family_*): `toy_gelu`, a Llama variant defined and registered below: a
GELU(tanh)-gated MLP, a (1 + w) RMSNorm, embeddings scaled by sqrt(D), a query scale of its own
(query_pre_attn_scalar), soft-capped logits, and HF tensor names of its own for the norms and the
MLP. A safetensors directory with its own config.json architecture loads through ji.load_model;
its logits match a forward written here in numpy from the checkpoint's tensors; the paged engine's
greedy tokens equal ji.generate's (the contiguous baseline) and tp = 2's on fake CPU devices (this
file run as a script in a process of its own: XLA_FLAGS must be set before jax starts); AWQ's and
SmoothQuant's folds go through its (1 + w) norm and leave its function unchanged.

Drafter (test_drafter_*): a drafter class defined below, registered by method name
(jaxinfer.speculative.register_drafter) for the length of the test, runs through the engine's
verify passes losslessly: greedy output equal to plain decoding, some drafts accepted, some rejected.
A drafter that asks for the hidden states entering two of the target's layers (as EAGLE-3 does)
gets them from the feature cache, equal to HF transformers' output_hidden_states.

Logits processor (test_processor_*): a processor defined below (ban one token) is registered
(jaxinfer.sampling.register), asked for by some requests through SamplingParams.extra_args, and
takes effect inside the jitted step under continuous batching, next to requests that do not ask:
their tokens equal HF generate's with bad_words_ids, the others' HF's plain greedy tokens.

  python tests/test_extensions.py family-tp DIR   the toy family from DIR at tp = 2: its greedy
                                                  tokens and logits, as JSON on the last line
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import jaxinfer as ji
from jaxinfer import quant, sharding
from jaxinfer.buckets import next_power_of_2
from jaxinfer.checkpoints.weights import ASSETS_DIR
from jaxinfer.models import family, llama
from jaxinfer.models.config import ModelConfig, write_common
from jaxinfer.quant import awq
from jaxinfer.quant import calibration as calib
from jaxinfer.sampling import Processor
from jaxinfer.sampling import register as register_processor
from jaxinfer.sampling import unregister as unregister_processor
from jaxinfer.speculative import DRAFTERS, Proposal, register_drafter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- a model family of its own ------------------------------------------------------------------

TOY_HF_NAMES = {"attn_norm": "ln_attn.weight", "mlp_norm": "ln_mlp.weight", "w_gate": "mlp.wi_gate.weight",
                "w_up": "mlp.wi_up.weight", "w_down": "mlp.wo.weight"}
TOY_VARIANT = llama.Variant("none")  # no biases, no q/k norm, no sliding windows


def _toy_read_config(fam: family.Family, hf: dict) -> ModelConfig:
    cfg = TOY_VARIANT.read_config(fam, hf)
    return dataclasses.replace(cfg, attention_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
                               embedding_scale=float(cfg.hidden_size) ** 0.5,
                               logit_softcap=float(hf["final_logit_softcapping"]))


def _toy_write_config(fam: family.Family, cfg: ModelConfig) -> dict:
    return {**write_common(cfg, fam), "query_pre_attn_scalar": round(cfg.attention_scale**-2),
            "final_logit_softcapping": cfg.logit_softcap}


TOY = family.register(dataclasses.replace(
    llama.LLAMA, name="toy_gelu", architectures=("ToyGeluForCausalLM",), gguf_architectures=(),
    gguf_reordered_rope=False, check_config=None,
    params=tuple(dataclasses.replace(p, hf=TOY_HF_NAMES.get(p.name, p.hf), gguf=None) for p in llama.PARAMS),
    norm=family.Norm("rms_plus_1"), activation="gelu_pytorch_tanh",
    read_config=_toy_read_config, write_config=_toy_write_config,
))

TOY_CONFIG = {
    "architectures": ["ToyGeluForCausalLM"], "model_type": "toy_gelu", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": False, "query_pre_attn_scalar": 24,
    "final_logit_softcapping": 3.0,
}
TOY_PROMPTS = [[3, 141, 59, 26, 53, 58, 97, 93, 23, 84], [62, 64, 33, 83, 27, 95]]
GREEDY = ji.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE_SHAPE = dict(max_batch=2, max_seq_len=64)
TOLERANCE = 1e-5  # float32 logits against the float64 reference, largest per-row relative error


def toy_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the toy family's HF names, large enough that the softmax, the
    GELU and the soft-cap all bend."""
    c, rng = TOY_CONFIG, np.random.default_rng(seed)
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    N, K, H = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def draw(*shape, std=0.15):
        return rng.normal(0.0, std, shape).astype(np.float32)

    t = {"model.embed_tokens.weight": draw(V, D, std=1.0), "model.norm.weight": draw(D, std=0.2),
         "lm_head.weight": draw(V, D, std=0.3)}
    for i in range(c["num_hidden_layers"]):
        layer = {"ln_attn.weight": draw(D, std=0.2), "ln_mlp.weight": draw(D, std=0.2),
                 "self_attn.q_proj.weight": draw(N * H, D), "self_attn.k_proj.weight": draw(K * H, D),
                 "self_attn.v_proj.weight": draw(K * H, D), "self_attn.o_proj.weight": draw(D, N * H),
                 "mlp.wi_gate.weight": draw(F, D), "mlp.wi_up.weight": draw(F, D), "mlp.wo.weight": draw(D, F)}
        t.update({f"model.layers.{i}.{name}": w for name, w in layer.items()})
    return t


def reference_logits(t: dict[str, np.ndarray], tokens) -> np.ndarray:
    """The toy family's forward in float64 numpy, written from its definition: tokens (T,) -> (T, V)."""
    c = TOY_CONFIG
    D, N, K, H = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    tokens = np.asarray(tokens)
    T = tokens.size

    def w(name):
        return t[name].astype(np.float64)

    def norm(x, weight):  # (1 + w) RMSNorm
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c["rms_norm_eps"]) * (1.0 + weight)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    angles = np.arange(T)[:, None] / c["rope_theta"] ** (np.arange(0, H, 2) / H)  # (T, H/2)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(x):  # (T, heads, H): the halves rotated as pairs (HF's rotate_half)
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = w("model.embed_tokens.weight")[tokens] * np.sqrt(D)  # (T, D)
    causal = np.tril(np.ones((T, T), bool))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w(p + "ln_attn.weight"))
        q = rope((h @ w(p + "self_attn.q_proj.weight").T).reshape(T, N, H))
        k = rope((h @ w(p + "self_attn.k_proj.weight").T).reshape(T, K, H))
        v = (h @ w(p + "self_attn.v_proj.weight").T).reshape(T, K, H)
        out = np.empty((T, N, H))
        for n in range(N):
            g = n // (N // K)  # the kv head of query head n
            scores = np.where(causal, q[:, n] @ k[:, g].T * c["query_pre_attn_scalar"] ** -0.5, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, n] = (probs / probs.sum(axis=-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(T, N * H) @ w(p + "self_attn.o_proj.weight").T
        h = norm(x, w(p + "ln_mlp.weight"))
        x = x + (gelu_tanh(h @ w(p + "mlp.wi_gate.weight").T) * (h @ w(p + "mlp.wi_up.weight").T)) @ w(
            p + "mlp.wo.weight").T
    logits = norm(x, w("model.norm.weight")) @ w("lm_head.weight").T
    cap = c["final_logit_softcapping"]
    return cap * np.tanh(logits / cap)


def write_toy(path: str, tensors: dict[str, np.ndarray]) -> str:
    """The toy family as an HF checkpoint directory: config.json and model.safetensors."""
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TOY_CONFIG, f)
    return path


def _row_errors(actual, expected) -> np.ndarray:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(a - e, axis=-1) / np.linalg.norm(e, axis=-1)


def _greedy(engine_or_model, prompts=TOY_PROMPTS) -> list[list[int]]:
    if isinstance(engine_or_model, ji.Engine):
        return [o.token_ids for o in engine_or_model.generate(prompts, GREEDY)]
    return [o.token_ids for o in ji.generate(engine_or_model, prompts, GREEDY)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tensors = toy_tensors()
    path = write_toy(str(tmp_path_factory.mktemp("toy_gelu")), tensors)
    return path, tensors, ji.load_model(path)


def test_family_registers_and_loads_by_its_own_names(toy, tmp_path):
    path, tensors, model = toy
    cfg = model.config
    assert cfg.model_type == "toy_gelu" and cfg.family is TOY and family.get("toy_gelu") is TOY
    assert cfg.attention_scale == 24**-0.5 and cfg.embedding_scale == 8.0 and cfg.logit_softcap == 3.0
    no_model_type = {k: v for k, v in TOY_CONFIG.items() if k != "model_type"}
    assert ModelConfig.from_hf_dict(no_model_type) == cfg  # found by its architecture
    np.testing.assert_array_equal(model.params["layers"]["w_gate"][1], tensors["model.layers.1.mlp.wi_gate.weight"].T)
    np.testing.assert_array_equal(model.params["layers"]["attn_norm"][0], tensors["model.layers.0.ln_attn.weight"])
    ji.save_hf_checkpoint(model, tmp_path / "again")  # the family's names and config.json fields
    again = ji.load_model(tmp_path / "again")
    assert again.config == cfg
    for name, x in model.params["layers"].items():
        np.testing.assert_array_equal(again.params["layers"][name], x, err_msg=name)


def test_family_refuses_a_second_meaning_of_a_param_name():
    wq_as_row = tuple(dataclasses.replace(p, role="row") if p.name == "wq" else p for p in TOY.params)
    with pytest.raises(ValueError, match="param 'wq' means"):
        family.register(dataclasses.replace(TOY, name="toy_bad", architectures=("ToyBadForCausalLM",),
                                            params=wq_as_row))
    assert "toy_bad" not in family.names()


def test_family_logits_match_the_numpy_reference(toy):
    _, tensors, model = toy
    tokens = np.asarray([TOY_PROMPTS[0], TOY_PROMPTS[0][::-1]], np.int32)
    logits = np.asarray(ji.forward_logits(model, tokens))
    expected = np.stack([reference_logits(tensors, row) for row in tokens])
    assert np.abs(expected).max() > 0.5 * TOY_CONFIG["final_logit_softcapping"]  # the soft-cap bends
    errors = _row_errors(logits.reshape(-1, logits.shape[-1]), expected.reshape(-1, expected.shape[-1]))
    assert errors.max() <= TOLERANCE, f"max row error {errors.max():.3g}"


@pytest.fixture(scope="module")
def toy_paged(toy) -> list[list[int]]:
    """The toy family's greedy tokens through the paged engine (tp = 1)."""
    return _greedy(ji.Engine(toy[2], ji.EngineConfig(**ENGINE_SHAPE)))


def test_family_paged_engine_matches_the_contiguous_baseline(toy, toy_paged):
    _, _, model = toy
    paged = toy_paged
    assert paged == _greedy(model)
    assert all(len(t) == GREEDY.max_tokens for t in paged) and len({tuple(t) for t in paged}) == 2


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_family_quantisation_folds_go_through_its_norm(toy, method):
    """SmoothQuant's and AWQ's per-channel factors fold into the (1 + w) norms' gains (and wv, w_up):
    the weights change, the float function does not (a fold into w itself would move the logits)."""
    _, _, model = toy
    windows = np.random.default_rng(1).integers(0, 256, size=(4, 24))
    if method == "smoothquant":
        folded = quant.smooth_model(model, 0.5, windows, progress=False)
    else:
        scheme = quant.QuantScheme(bits=4, group_size=32, method="awq")
        run = calib.run_layers(model, windows, lambda layer, lp, st: awq.scale_layer(model.config, lp, st, scheme)[0],
                               progress=False)
        folded = dataclasses.replace(model, params={**model.params, "layers": run.layers})
    for name in ("attn_norm", "mlp_norm", "w_up", "w_down"):
        change = np.abs(np.asarray(folded.params["layers"][name]) - np.asarray(model.params["layers"][name]))
        assert change.max() > 1e-2, name
    tokens = np.asarray(windows[:2], np.int32)
    errors = _row_errors(np.asarray(ji.forward_logits(folded, tokens)), np.asarray(ji.forward_logits(model, tokens)))
    assert errors.max() <= TOLERANCE, f"max row error {errors.max():.3g}"


@pytest.mark.slow  # a process of its own: 14 s on the 2-core CPU
def test_family_tensor_parallel_on_fake_devices(toy, toy_paged):
    path, tensors, _ = toy
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {os.environ.get('XLA_FLAGS', '')}"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "family-tp", path], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["tokens"] == toy_paged
    expected = np.stack([reference_logits(tensors, row) for row in TOY_PROMPTS[:1]])
    assert _row_errors(np.asarray(out["logits"]), expected[0]).max() <= TOLERANCE


def _family_tp(path: str) -> dict:
    """The toy family at tp = 2: greedy tokens through the paged engine, logits of the first prompt."""
    model = ji.load_model(path)
    engine = ji.Engine(model, ji.EngineConfig(tp=2, **ENGINE_SHAPE))
    placed = sharding.shard_model(model, sharding.make_mesh(2))
    logits = ji.forward_logits(placed, np.asarray(TOY_PROMPTS[:1], np.int32))[0]
    return {"tokens": _greedy(engine), "logits": np.asarray(logits).tolist(),
            "devices": len(sharding.nbytes_per_device(engine.runner.cache))}


# --- a drafter of its own ------------------------------------------------------------------------

DRAFTER_GREEDY = ji.SamplingParams(max_tokens=24, temperature=0.0)
DRAFTER_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):"]


@pytest.fixture(scope="module")
def tiny():
    return ji.load_model("tiny")


class OracleDrafter:
    """Proposes the continuation it was told (the target's own greedy tokens), wrong at every
    third generated position: some drafts are accepted, some rejected, none may change the output."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], vocab_size: int):
        self.answers, self.vocab_size = answers, vocab_size

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        tokens = np.zeros((next_power_of_2(len(seqs)), k), np.int32)
        for i, (s, want) in enumerate(zip(seqs, num_drafts)):
            answer, g = self.answers[tuple(s.tokens[: s.prompt_len])], len(s.generated)
            for j in range(want):
                t = answer[g + j] if g + j < len(answer) else 0
                tokens[i, j] = (t + 1) % self.vocab_size if (g + j) % 3 == 2 else t
        return Proposal(tokens)

    def accepted(self, seqs) -> None:
        pass

    def copy_pages(self, copies) -> None:
        pass


def test_drafter_defined_outside_the_library_runs_losslessly(tiny, monkeypatch):
    plain = ji.Engine(tiny, ji.EngineConfig(max_batch=4)).generate(DRAFTER_PROMPTS, DRAFTER_GREEDY)
    answers = {tuple(o.prompt_token_ids): o.token_ids for o in plain}
    monkeypatch.setitem(DRAFTERS, "oracle", None)  # registered below; removed again after the test

    @register_drafter("oracle", checkpoint=False, features=False)
    def build(ctx):
        assert ctx.path is None and ctx.target.config == tiny.config
        return OracleDrafter(answers, ctx.target.config.vocab_size)

    spec = ji.SpeculativeConfig(method="oracle", num_tokens=4)
    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=4, speculative=spec))
    outs = engine.generate(DRAFTER_PROMPTS, DRAFTER_GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    m = engine.metrics()
    # Two of every three drafts are right: chains of 2 are accepted, each pass emits about 3 tokens.
    assert 0.3 < m["spec_acceptance_rate"] < 0.9 and m["spec_tokens_per_pass"] > 2.0, m
    assert m["spec_accepted"] >= 10


class LayerReader:
    """Reads the feature cache a drafter asked for: at each sequence's last computed token, the
    final-norm hidden state and the hidden states entering feature_layers. Drafts nothing."""

    feature_layers = (0, 2)

    def __init__(self, page_size: int):
        self.page_size, self.seen = page_size, []  # (prompt, position, row (3 * D,))

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        page = self.page_size
        for s in seqs:
            p = s.num_computed - 1
            row = np.asarray(features[s.pages[p // page] * page + p % page])
            self.seen.append((tuple(s.tokens[: s.prompt_len]), p, row))
        return Proposal(np.zeros((next_power_of_2(len(seqs)), k), np.int32), counts=[0] * len(seqs))

    def accepted(self, seqs) -> None:
        pass

    def copy_pages(self, copies) -> None:
        pass


def test_drafter_gets_the_hidden_states_of_the_layers_it_asks_for(tiny, monkeypatch):
    import torch  # noqa: PLC0415  (HF transformers: the reference)
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    readers = []
    monkeypatch.setitem(DRAFTERS, "layers", None)

    @register_drafter("layers", checkpoint=False, features=True)
    def build(ctx):
        readers.append(LayerReader(ctx.page_size))
        return readers[-1]

    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=4, speculative=ji.SpeculativeConfig(method="layers")))
    outs = engine.generate(DRAFTER_PROMPTS[:2], ji.SamplingParams(max_tokens=6, temperature=0.0))
    D = tiny.config.hidden_size
    assert engine.runner.features.shape[1] == 3 * D
    hf = LlamaForCausalLM.from_pretrained(os.path.join(ji.checkpoints.weights.ASSETS_DIR, "tiny"),
                                          torch_dtype=torch.float32)
    streams = {tuple(o.prompt_token_ids): o.prompt_token_ids + o.token_ids for o in outs}
    (reader,) = readers
    assert len(reader.seen) >= 8
    for prompt, p, row in reader.seen:
        with torch.no_grad():
            hidden = hf(torch.tensor([streams[prompt][: p + 1]]), output_hidden_states=True).hidden_states
        want = np.stack([hidden[-1][0, p].numpy(), hidden[0][0, p].numpy(), hidden[2][0, p].numpy()])
        assert _row_errors(row.reshape(3, D), want).max() <= 1e-5


# --- a logits processor of its own ---------------------------------------------------------------

traced = []  # what the processor saw each time a program that carries it was traced


def _ban_fill(rows, vocab):
    """The banned token of each row (a row that does not ask: the vocabulary size, which bans nothing)."""
    return {"token": np.asarray([r.sampling.extra_args["ban"] if r is not None else vocab.size for r in rows],
                                np.int32)}


def _ban(logits, arrays, ctx):
    traced.append(isinstance(logits, jax.core.Tracer))
    return logits.at[jnp.arange(logits.shape[0]), arrays["token"]].set(-jnp.inf, mode="drop")


def _ban_check(params, vocab):
    if not 0 <= params.extra_args["ban"] < vocab.size:
        raise ValueError(f"extra_args['ban'] must be a token id in [0, {vocab.size})")


BAN = Processor("ban", asks=lambda sp: "ban" in (sp.extra_args or {}), fill=_ban_fill, apply=_ban, check=_ban_check)


@pytest.fixture
def ban_processor():
    register_processor(BAN)
    yield
    unregister_processor("ban")


def test_processor_defined_outside_the_library_bans_its_token_in_the_jitted_step(tiny, ban_processor):
    prompts = [tiny.tokenizer.encode(p) for p in ("def fibonacci(n):", "The quick brown fox", "import os\nimport",
                                                  "def fibonacci(n):")]
    plain = ji.SamplingParams(max_tokens=12, temperature=0.0)
    banned = ji.SamplingParams(max_tokens=12, temperature=0.0, extra_args={"ban": 32})  # the space
    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=2, page_size=8))  # four requests through two slots
    outs = engine.generate(prompts, [banned, plain, banned, plain])
    assert traced and all(traced)  # it ran while the step was traced: inside the jitted program

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ASSETS_DIR, "tiny"), dtype=torch.float32)
    for prompt, out, bad in zip(prompts, outs, ([[32]], None, [[32]], None)):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              bad_words_ids=bad, eos_token_id=list(tiny.tokenizer.eos_ids), pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    assert all(32 not in o.token_ids for o in outs[::2]) and all(32 in o.token_ids for o in outs[1::2])
    with pytest.raises(ValueError, match=r"extra_args\['ban'\] must be a token id in \[0, 258\)"):
        engine.add_request(prompts[0], ji.SamplingParams(extra_args={"ban": 999}))

if __name__ == "__main__":
    if sys.argv[1:2] == ["family-tp"]:
        print(json.dumps(_family_tp(sys.argv[2])))
    else:
        sys.exit(__doc__)
