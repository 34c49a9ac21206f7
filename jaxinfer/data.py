"""Text every Python installation carries, as token streams, and held-out evaluation.

The corpus is the English documentation in `pydoc_data.topics` plus the standard library's own
source. Documents are split into train and held-out by a hash of their name, so the split does
not depend on which files exist. For training the shipped byte-level models, each document is
`BOS bytes EOS` in the ByteTokenizer's ids (`load_corpus`). For evaluation and calibration, the
held-out documents are encoded by each model's own tokenizer (`heldout_stream`), and bits per
byte divide by the bytes of the text itself, so models with different tokenizers compare.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sysconfig
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.checkpoints.tokenizer import ByteTokenizer
from jaxinfer.models import decoder as model_lib

HELDOUT_EVERY = 20  # one document in 20 is held out
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # (n_train,) int32 token stream
    heldout: np.ndarray  # (n_heldout,) int32 token stream
    num_docs: tuple[int, int]  # (train, held-out)


def _documents() -> list[tuple[str, str]]:
    from pydoc_data import topics

    docs = [(f"pydoc/{name}", text) for name, text in sorted(topics.topics.items())]
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test"))
        paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                docs.append((os.path.relpath(path, stdlib), f.read()))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


@functools.lru_cache(maxsize=4)
def load_corpus(max_train_bytes: int = 64 << 20) -> Corpus:
    """The byte-level corpus; the train stream stops after about max_train_bytes."""
    tok = ByteTokenizer()
    train, heldout = [], []
    n_train = n_heldout = size = 0
    for name, text in _documents():
        ids = np.asarray([tok.bos_id, *text.encode("utf-8"), tok.eos_ids[0]], np.int32)
        if is_heldout(name):
            heldout.append(ids)
            n_heldout += 1
        elif size < max_train_bytes:
            train.append(ids)
            size += ids.size
            n_train += 1
    return Corpus(np.concatenate(train), np.concatenate(heldout), (n_train, n_heldout))


def save_corpus(corpus: Corpus, path: str) -> None:
    """Write the token streams (uint16) so another machine trains on exactly this corpus."""
    np.savez_compressed(path, train=corpus.train.astype(np.uint16), heldout=corpus.heldout.astype(np.uint16),
                        num_docs=np.asarray(corpus.num_docs))


def read_corpus(path: str) -> Corpus:
    with np.load(path) as f:
        return Corpus(f["train"].astype(np.int32), f["heldout"].astype(np.int32), tuple(int(x) for x in f["num_docs"]))


@functools.lru_cache(maxsize=2)
def texts(split: str, max_bytes: int = 64 << 20) -> tuple[str, ...]:
    """The documents of a split ("train" or "heldout", which no model trained here has seen), in
    corpus order; the train split stops after about max_bytes."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not one of 'train', 'heldout'")
    out, size = [], 0
    for name, text in _documents():
        if is_heldout(name) == (split == "heldout") and size < max_bytes:
            out.append(text)
            size += len(text)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Held-out text in one tokenizer's tokens: each document encoded as the tokenizer does
    (its BOS included when it adds one), then its EOS.
      ids     (n,) int32  token ids
      nbytes  (n,) int32  bytes of text each token stands for (0: special tokens)"""

    ids: np.ndarray
    nbytes: np.ndarray


@functools.lru_cache(maxsize=4)
def text_stream(tokenizer, split: str = "heldout") -> TokenStream:
    """A split's documents through `tokenizer` (cached per tokenizer and split)."""
    eos = list(tokenizer.eos_ids[:1])
    ids = np.concatenate([np.asarray(tokenizer.encode(t) + eos, np.int32) for t in texts(split)])
    return TokenStream(ids, tokenizer.token_bytes()[ids])


def heldout_stream(tokenizer) -> TokenStream:
    """The held-out documents through `tokenizer`: what evaluation and calibration read."""
    return text_stream(tokenizer, "heldout")


@dataclasses.dataclass(frozen=True)
class Windows:
    """Evaluation windows of held-out text: tokens (num, T + 1) int32 and nbytes (num, T + 1) int32
    (see TokenStream); a model reads tokens[:, :-1] and is scored on tokens[:, 1:]."""

    tokens: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def _tokenizer_of(model, what: str):
    if model.tokenizer is None:
        raise ValueError(f"{what} tokenises held-out text with the model's tokenizer, and this model has none")
    return model.tokenizer


def heldout_windows(model, seq_len: int, num: int, offset: int = 0) -> Windows:
    """`num` non-overlapping windows of seq_len + 1 tokens of held-out text in the model's own
    tokens, starting `offset` tokens into the stream."""
    stream = heldout_stream(_tokenizer_of(model, "held-out evaluation"))
    if seq_len < 1 or num < 1:
        raise ValueError(f"seq_len={seq_len} and windows={num} must be >= 1")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} is over the model's context of {model.config.max_position_embeddings}")
    needed = offset + num * (seq_len + 1)
    if stream.ids.size < needed:
        raise ValueError(f"the held-out stream has {stream.ids.size} tokens, {needed} needed")
    shape = (num, seq_len + 1)
    return Windows(stream.ids[offset:needed].reshape(shape), stream.nbytes[offset:needed].reshape(shape))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _window_nll(params, cfg, windows, nbytes, impl):
    """Summed negative log-likelihood (nats) of the targets that are text, and their bytes."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits = model_lib.forward(params, cfg, inputs, positions, impl=impl).logits  # (B, T, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    text = nbytes[:, 1:] > 0  # special tokens (BOS, EOS) are not text
    return jnp.sum(jnp.where(text, nll, 0.0)), jnp.sum(nbytes[:, 1:])


def bits_per_byte(model, windows: Windows, batch_size: int = 16, kv_dtype: str | None = None) -> float:
    """Bits the model spends per byte of text in the windows (teacher forcing): comparable across
    tokenizers, since the bytes are the text's own. kv_dtype: read keys and values as an int8 /
    fp8 KV cache holds them."""
    total, count = 0.0, 0
    impl = model_lib.Impl(kv_dtype=kv_dtype)
    for i in range(0, len(windows), batch_size):
        nll, n = _window_nll(model.params, model.config, jnp.asarray(windows.tokens[i : i + batch_size]),
                             jnp.asarray(windows.nbytes[i : i + batch_size]), impl)
        total, count = total + float(nll), count + int(n)
    return total / count / math.log(2)


@functools.partial(jax.jit, static_argnames=("cfg_a", "cfg_b", "impl_a"))
def _argmax_agreement(params_a, cfg_a, params_b, cfg_b, inputs, impl_a):
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    a = jnp.argmax(model_lib.forward(params_a, cfg_a, inputs, positions, impl=impl_a).logits, axis=-1)
    b = jnp.argmax(model_lib.forward(params_b, cfg_b, inputs, positions).logits, axis=-1)
    return jnp.sum(a == b), a.size


def greedy_agreement(model_a, model_b, windows: Windows, batch_size: int = 16, kv_dtype: str | None = None) -> float:
    """Fraction of positions where both models' argmax next tokens agree, on the same text (both
    models must share a tokenizer); kv_dtype applies to model_a (see bits_per_byte)."""
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise ValueError(f"greedy agreement needs one vocabulary; the models have {model_a.config.vocab_size} "
                         f"and {model_b.config.vocab_size} tokens")
    same = total = 0
    for i in range(0, len(windows), batch_size):
        s, n = _argmax_agreement(model_a.params, model_a.config, model_b.params, model_b.config,
                                 jnp.asarray(windows.tokens[i : i + batch_size, :-1]), model_lib.Impl(kv_dtype=kv_dtype))
        same, total = same + int(s), total + int(n)
    return same / total
