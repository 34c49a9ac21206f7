"""Text every Python installation carries, as byte-level token streams, and held-out evaluation.

The corpus is the English documentation in `pydoc_data.topics` plus the standard library's own
source. Documents are split into train and held-out by a hash of their name, so the split does
not depend on which files exist. Each document is `BOS bytes EOS` in the ByteTokenizer's ids.
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

from jaxinfer import model as model_lib
from jaxinfer.tokenizer import ByteTokenizer

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


def heldout_windows(corpus: Corpus, seq_len: int, num: int) -> np.ndarray:
    """(num, seq_len + 1) non-overlapping windows from the start of the held-out stream."""
    needed = num * (seq_len + 1)
    if corpus.heldout.size < needed:
        raise ValueError(f"held-out stream has {corpus.heldout.size} tokens, {needed} needed")
    return corpus.heldout[:needed].reshape(num, seq_len + 1)


@functools.partial(jax.jit, static_argnames="cfg")
def _window_nll(params, cfg, windows):
    """Summed negative log-likelihood (nats) of byte targets, and their count."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits = model_lib.forward(params, cfg, inputs, positions).logits  # (B, T, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    is_byte = targets < 256  # BOS/EOS are not bytes of text
    return jnp.sum(jnp.where(is_byte, nll, 0.0)), jnp.sum(is_byte)


def bits_per_byte(model, windows: np.ndarray, batch_size: int = 16) -> float:
    """Mean bits per byte of text the model assigns to windows (teacher forcing)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        nll, n = _window_nll(model.params, model.config, jnp.asarray(windows[i : i + batch_size]))
        total, count = total + float(nll), count + int(n)
    return total / count / math.log(2)


@functools.partial(jax.jit, static_argnames=("cfg_a", "cfg_b"))
def _argmax_agreement(params_a, cfg_a, params_b, cfg_b, inputs):
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    a = jnp.argmax(model_lib.forward(params_a, cfg_a, inputs, positions).logits, axis=-1)
    b = jnp.argmax(model_lib.forward(params_b, cfg_b, inputs, positions).logits, axis=-1)
    return jnp.sum(a == b), a.size


def greedy_agreement(model_a, model_b, windows: np.ndarray, batch_size: int = 16) -> float:
    """Fraction of positions where both models' argmax next tokens agree, on the same text."""
    same = total = 0
    for i in range(0, len(windows), batch_size):
        s, n = _argmax_agreement(
            model_a.params, model_a.config, model_b.params, model_b.config, jnp.asarray(windows[i : i + batch_size, :-1])
        )
        same, total = same + int(s), total + int(n)
    return same / total
