"""EAGLE-3: the published checkpoint format (written here from the tensor names SGLang and vLLM
load, not through jaxinfer's writer), lossless drafting, and the drafter's chain against the
reference unroll it trains with."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from helpers import spy_proposals
from jaxinfer.models import decoder as model_lib
from jaxinfer.speculative import eagle3

GREEDY = ji.SamplingParams(max_tokens=16, temperature=0.0)
HF_PATH: list[str] = []  # where hf_target wrote its checkpoint (hf_hidden reads it back with transformers)
PROMPTS = ["def fibonacci(n):\n    if n", "import os\nimport sys\n", "class Queue:\n    def", "The",
           "def fibonacci(n):\n    return"]
# Preemption (4 pages of 16 for 5 prompts through 3 slots) and a shared prefix page.
BASE = ji.EngineConfig(max_batch=3, page_size=16, num_pages=4)


@pytest.fixture(scope="module")
def hf_target(tmp_path_factory):
    """A small random Llama written by HF transformers' own class, loaded by path (7 layers: the
    default fused layers 2, 3, 4 are distinct)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.3)
    path = tmp_path_factory.mktemp("hf-llama")
    transformers.LlamaForCausalLM(hf).save_pretrained(path, safe_serialization=True)
    HF_PATH[:] = [str(path)]
    model = ji.load_model(str(path))
    return ji.Model(model.config, model.params, ji.ByteTokenizer())


def write_published(path, *, hidden=64, target_hidden=64, heads=4, kv_heads=2, inter=96, vocab=258,
                    draft_vocab=None, aux=None, seed=0, std=0.3, drop=(), reshape=None, config=None):
    """An EAGLE-3 directory as published: config.json and model.safetensors, torch layout."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    hd = hidden // heads
    W = vocab if draft_vocab is None else len(draft_vocab)
    shapes = {"fc.weight": (hidden, 3 * target_hidden),
              "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * hidden),
              "midlayer.self_attn.k_proj.weight": (kv_heads * hd, 2 * hidden),
              "midlayer.self_attn.v_proj.weight": (kv_heads * hd, 2 * hidden),
              "midlayer.self_attn.o_proj.weight": (hidden, heads * hd),
              "midlayer.mlp.gate_proj.weight": (inter, hidden), "midlayer.mlp.up_proj.weight": (inter, hidden),
              "midlayer.mlp.down_proj.weight": (hidden, inter), "lm_head.weight": (W, hidden)}
    tensors = {k: (std * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for name in ("midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                 "midlayer.post_attention_layernorm.weight", "norm.weight"):
        tensors[name] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    if draft_vocab is not None:
        tensors["d2t"] = (np.asarray(draft_vocab) - np.arange(W)).astype(np.int64)
        t2d = np.zeros(vocab, bool)
        t2d[draft_vocab] = True
        tensors["t2d"] = t2d
    for name, shape in (reshape or {}).items():
        tensors[name] = np.zeros(shape, tensors[name].dtype)
    for name in drop:
        tensors.pop(name)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
          "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
          "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
          "vocab_size": vocab, "draft_vocab_size": W, "hidden_act": "silu", "tie_word_embeddings": False,
          "torch_dtype": "float32"}
    if aux is not None:
        hf["eagle_aux_hidden_state_layer_ids"] = list(aux)
    hf.update(config or {})
    (path / "config.json").write_text(json.dumps(hf))
    return str(path)


DRAFT_VOCAB = np.arange(0, 258, 2)  # 129 of the 258 tokens


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("eagle3") / "draft", draft_vocab=DRAFT_VOCAB, aux=(1, 3, 4))


@pytest.fixture(scope="module")
def plain(hf_target):
    params = [dataclasses.replace(GREEDY, max_tokens=m) for m in (14, 9, 14, 3, 14)]
    engine = ji.Engine(hf_target, BASE)
    outs = engine.generate(PROMPTS, params)
    assert engine.stats["preemptions"] > 0 and engine.allocator.hits > 0
    return params, [o.token_ids for o in outs]


def _first_chain(engine, prompt, k):
    """The first sequence's tokens (the prompt and the target's first token) and its first k drafts
    (room for all k: a request near its end gets fewer)."""
    seen = spy_proposals(engine)
    engine.generate([prompt], dataclasses.replace(GREEDY, max_tokens=k + 2))
    (tokens,), drafts = seen[0]
    assert drafts.shape[1] == k
    return tokens, drafts[0].tolist()


@pytest.mark.parametrize("tree", [None, pytest.param(ji.DraftTree(top_k=2, depth=3), marks=pytest.mark.slow)],
                         ids=["chain", "tree"])
def test_a_published_checkpoint_drafts_losslessly(hf_target, published, plain, tree):
    """A random EAGLE-3 head in the SGLang/vLLM layout, loaded by path next to an HF Llama target,
    gives the plain engine's greedy tokens under continuous batching, preemption and prefix hits,
    and drafts from its draft vocabulary only."""
    params, expected = plain
    spec = ji.SpeculativeConfig(method="eagle3", num_tokens=4, draft=published, tree=tree)
    engine = ji.Engine(hf_target, dataclasses.replace(BASE, speculative=spec))
    assert engine.drafter.feature_layers == (1, 3, 4)
    seen = spy_proposals(engine)
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == expected
    assert engine.metrics()["spec_passes"] > 0 and engine.allocator.num_used == 0
    assert np.isin(np.concatenate([drafts for _, drafts in seen]), DRAFT_VOCAB).all()


@pytest.mark.slow  # 7 s: the fast tier stays under 5 minutes (the lossless chain tests stay fast)
def test_the_drafters_chain_is_the_reference_unroll(hf_target, published):
    """The engine's first chain of drafts after a prompt equals, token for token, the greedy
    choices of `unroll` (the reference training runs) at the prompt's last row, teacher-forced on
    those drafts: the paged, cached drafting path computes what training optimises."""
    k = 5
    engine = ji.Engine(hf_target, ji.EngineConfig(max_batch=1, page_size=16, speculative=ji.SpeculativeConfig(
        method="eagle3", num_tokens=k, draft=published)))
    tokens, drafts = _first_chain(engine, "import numpy as np\n", k)  # the prompt and the target's first token
    n = len(tokens) - 1
    head, params, aux_layers = eagle3.load(published, hf_target.config, jnp.float32)
    window = jnp.asarray([tokens + drafts[: k - 1]], jnp.int32)
    out = model_lib.forward(hf_target.params, hf_target.config, window,
                            jnp.arange(window.shape[1], dtype=jnp.int32)[None], aux_layers=tuple(sorted(aux_layers)))
    aux = jnp.concatenate(list(out.aux), axis=-1)  # (1, T, 3D) in layer order
    steps = eagle3.unroll(head, hf_target.params, params, aux, window, k)
    guesses = [int(DRAFT_VOCAB[int(jnp.argmax(s[0, n - 1]))]) for s in steps]
    assert guesses == drafts


def test_save_writes_the_published_format(hf_target, published, tmp_path):
    """save() writes what load() and the published layout read: the same tensor names, shapes and
    values, d2t/t2d for the draft vocabulary, the fused layers in both conventions."""
    head, params, aux = eagle3.load(published, hf_target.config, jnp.float32)
    eagle3.save(tmp_path, head, params, aux, hf_target.config)
    from safetensors.numpy import load_file  # noqa: PLC0415

    ours, theirs = load_file(str(tmp_path / "model.safetensors")), load_file(published + "/model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 129
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]  # SGLang: layer outputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_hidden=32), r"tensor 'fc.weight' has shape \(64, 96\), the target needs \(64, 192\)"),
    (dict(reshape={"midlayer.self_attn.q_proj.weight": (64, 64)}),
     r"'midlayer.self_attn.q_proj.weight' has shape \(64, 64\), the target needs \(64, 128\)"),
    (dict(vocab=300), "vocab_size=300, the target's is 258"),
    (dict(drop=("midlayer.hidden_norm.weight",)), "missing tensor 'midlayer.hidden_norm.weight'"),
    (dict(draft_vocab=DRAFT_VOCAB, drop=("d2t",)), "draft_vocab_size=129 < vocab_size=258 but no 'd2t'"),
    (dict(aux=(1, 3, 9)), r"aux hidden-state layers \[1, 3, 9\] must be three distinct layers of the target's 7"),
    (dict(aux=(1, 3, 3)), "must be three distinct layers"),
    (dict(config={"architectures": ["LlamaForCausalLM"]}), "not \\['LlamaForCausalLMEagle3'\\]"),
    (dict(config={"eagle_aux_hidden_state_layer_ids": [1, 2, 3],
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}}), "disagree"),
])
def test_a_draft_that_does_not_fit_is_refused(hf_target, tmp_path, kwargs, message):
    path = write_published(tmp_path / "bad", **kwargs)
    with pytest.raises(ValueError, match=message):
        ji.Engine(hf_target, ji.EngineConfig(speculative=ji.SpeculativeConfig(method="eagle3", draft=path)))


def test_bad_d2t_and_t2d_are_refused(hf_target, tmp_path):
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    path = write_published(tmp_path / "d", draft_vocab=DRAFT_VOCAB)
    tensors = load_file(path + "/model.safetensors")
    t2d = tensors["t2d"].copy()
    t2d[1] = True
    save_file({**tensors, "t2d": t2d}, path + "/model.safetensors")
    with pytest.raises(ValueError, match="'t2d' does not mark the target ids 'd2t' maps to"):
        eagle3.load(path, hf_target.config, jnp.float32)
    save_file({**tensors, "d2t": np.full(129, 200, np.int64)}, path + "/model.safetensors")
    with pytest.raises(ValueError, match="'d2t' maps draft ids to target ids outside"):
        eagle3.load(path, hf_target.config, jnp.float32)


@pytest.mark.slow  # the fast tier keeps the draft model's sampling test (test_speculative.py)
def test_sampled_tokens_are_the_targets(hf_target, published):
    """At temperature 1 (top-p 0.9) every request gets the tokens plain decoding draws for it:
    the acceptance rule keeps the target's draws whatever EAGLE-3 drafts."""
    sampling = [ji.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=s) for s in range(5)]
    expected = [o.token_ids for o in ji.Engine(hf_target, BASE).generate(PROMPTS, sampling)]
    spec = ji.SpeculativeConfig(method="eagle3", num_tokens=3, draft=published)
    engine = ji.Engine(hf_target, dataclasses.replace(BASE, speculative=spec))
    assert [o.token_ids for o in engine.generate(PROMPTS, sampling)] == expected
    assert engine.metrics()["spec_passes"] > 0


@pytest.mark.slow
def test_int8_kv_cache_keeps_greedy_tokens(hf_target, published):
    """With an int8 KV cache the drafter changes nothing: speculative decoding gives the tokens the
    same int8 engine gives without it."""
    config = dataclasses.replace(BASE, kv_dtype="int8")
    expected = [o.token_ids for o in ji.Engine(hf_target, config).generate(PROMPTS, GREEDY)]
    spec = ji.SpeculativeConfig(method="eagle3", num_tokens=4, draft=published, tree=ji.DraftTree(top_k=2, depth=3))
    assert [o.token_ids for o in ji.Engine(hf_target, dataclasses.replace(config, speculative=spec)).generate(
        PROMPTS, GREEDY)] == expected


# --- the published formulas, in numpy, against HF transformers' hidden states ----------------------


def _rms(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta=10000.0):
    """HF's rotate-half RoPE of x (T, heads, H) at positions 0..T-1."""
    T, H = x.shape[0], x.shape[-1]
    angles = np.arange(T)[:, None] * (1.0 / theta ** (np.arange(0, H, 2) / H))[None]
    cos, sin = (np.concatenate([f(angles)] * 2, -1)[:, None] for f in (np.cos, np.sin))
    return x * cos + np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], -1) * sin


def _llama_layer(x, attn_in, t, prefix, heads, kv_heads):
    """One Llama layer in torch layout: attention reads attn_in (T, *), the residual is x (T, D)."""
    T = x.shape[0]
    H = t[prefix + "self_attn.q_proj.weight"].shape[0] // heads
    q = _rope((attn_in @ t[prefix + "self_attn.q_proj.weight"].T).reshape(T, heads, H))
    k = _rope((attn_in @ t[prefix + "self_attn.k_proj.weight"].T).reshape(T, kv_heads, H))
    v = (attn_in @ t[prefix + "self_attn.v_proj.weight"].T).reshape(T, kv_heads, H)
    k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
    scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    o = np.einsum("nts,snh->tnh", p / p.sum(-1, keepdims=True), v).reshape(T, heads * H)
    y = x + o @ t[prefix + "self_attn.o_proj.weight"].T
    m = _rms(y, t[prefix + "post_attention_layernorm.weight"])
    gate = m @ t[prefix + "mlp.gate_proj.weight"].T
    return y + (gate / (1 + np.exp(-gate)) * (m @ t[prefix + "mlp.up_proj.weight"].T)) @ t[prefix + "mlp.down_proj.weight"].T


def _chain(h, tokens, step, k):
    """Greedy chain drafting by recomputing the pairs (h_t, token t + 1) causally each step:
    step(h (T, D), tokens (T,)) -> (outputs' next hidden states (T, D), their draft tokens (T,))."""
    h, tokens, drafts = list(h), list(tokens), []
    for _ in range(k):
        nxt, guess = step(np.asarray(h), np.asarray(tokens))
        drafts.append(int(guess[-1]))
        h.append(nxt[-1])
        tokens.append(drafts[-1])
    return drafts


@pytest.fixture(scope="module")
def hf_hidden(hf_target):
    """HF transformers' own model of the target: hidden_states of a token list (its output_hidden_states)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    model = transformers.LlamaForCausalLM.from_pretrained(HF_PATH[0]).eval()

    def hidden(tokens):
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_hidden_states=True)
        return [h[0].numpy().astype(np.float64) for h in out.hidden_states]

    return hidden


def test_eagle3_drafts_follow_the_published_formulas(hf_target, published, hf_hidden):
    """The engine's first two EAGLE-3 drafts equal the published model computed in numpy from the
    checkpoint's tensors and HF transformers' hidden states: g = [a ; b ; c] fc^T (layers 1, 3, 4
    in), u = [rms(e) ; rms(h)], h + attention(u), its MLP, rms(out) lm_head^T through d2t, the next
    pair carrying out."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    t = {k: v.astype(np.float64) for k, v in load_file(published + "/model.safetensors").items()}
    engine = ji.Engine(hf_target, ji.EngineConfig(max_batch=1, page_size=16, speculative=ji.SpeculativeConfig(
        method="eagle3", num_tokens=2, draft=published)))
    tokens, drafts = _first_chain(engine, "import numpy as np\n", 2)
    states = hf_hidden(tokens[:-1])  # the target computed the prompt; tokens[-1] is its first token
    g = np.concatenate([states[i] for i in (1, 3, 4)], -1) @ t["fc.weight"].T
    embed = np.asarray(hf_target.params["embed"], np.float64)
    d2t = t["d2t"].astype(np.int64)

    def step(h, nxt):
        u = np.concatenate([_rms(embed[nxt], t["midlayer.input_layernorm.weight"]),
                            _rms(h, t["midlayer.hidden_norm.weight"])], -1)
        out = _llama_layer(h, u, t, "midlayer.", 4, 2)
        draft = np.argmax(_rms(out, t["norm.weight"]) @ t["lm_head.weight"].T, -1)
        return out, draft + d2t[draft]

    assert _chain(g, tokens[1:], step, 2) == drafts


@pytest.mark.slow  # 22 s: the fast tier has EAGLE-3's formula test
def test_an_eagle_reference_checkpoint_loads(hf_target, plain, tmp_path, hf_hidden):
    """An EAGLE-1/2 head in the reference repository's layout (config.json, model.safetensors: fc
    with its bias over [e ; f], layers.0.* without input_layernorm, no final norm), written here
    from its tensor names: its drafts follow those formulas (numpy against HF's hidden states) and
    decoding stays lossless, chain and tree."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    rng, D, F = np.random.default_rng(3), 64, 96
    shapes = {"fc.weight": (D, 2 * D), "fc.bias": (D,), "layers.0.self_attn.q_proj.weight": (D, D),
              "layers.0.self_attn.k_proj.weight": (32, D), "layers.0.self_attn.v_proj.weight": (32, D),
              "layers.0.self_attn.o_proj.weight": (D, D), "layers.0.mlp.gate_proj.weight": (F, D),
              "layers.0.mlp.up_proj.weight": (F, D), "layers.0.mlp.down_proj.weight": (D, F)}
    t = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}  # no norm: keep it tame
    t["layers.0.post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": D, "intermediate_size": F, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 258, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "bias": True}))
    engine = ji.Engine(hf_target, ji.EngineConfig(max_batch=1, page_size=16, speculative=ji.SpeculativeConfig(
        method="eagle", num_tokens=2, draft=str(tmp_path))))
    tokens, drafts = _first_chain(engine, "import numpy as np\n", 2)
    t = {k: v.astype(np.float64) for k, v in t.items()}
    embed = np.asarray(hf_target.params["embed"], np.float64)
    head = np.asarray(hf_target.params["lm_head"], np.float64)  # (D, V)

    def step(h, nxt):
        x = np.concatenate([embed[nxt], h], -1) @ t["fc.weight"].T + t["fc.bias"]
        out = _llama_layer(x, x, t, "layers.0.", 4, 2)
        return out, np.argmax(out @ head, -1)

    assert _chain(hf_hidden(tokens[:-1])[-1], tokens[1:], step, 2) == drafts
    params, expected = plain
    for tree in (None, ji.DraftTree(top_k=2, depth=3)):
        spec = ji.SpeculativeConfig(method="eagle", num_tokens=4, draft=str(tmp_path), tree=tree)
        engine = ji.Engine(hf_target, dataclasses.replace(BASE, speculative=spec))
        assert [o.token_ids for o in engine.generate(PROMPTS, params)] == expected
