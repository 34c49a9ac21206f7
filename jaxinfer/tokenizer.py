"""Tokenizers: HF `tokenizers` (a tokenizer.json) and a byte-level tokenizer.

Both expose the same small surface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_ids`.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def save(self, ckpt_dir: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255), then BOS (256) and EOS (257)."""

    vocab_size = 258
    bos_id = 256
    eos_ids = (257,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        with open(os.path.join(ckpt_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "ByteTokenizer"}, f)


class HFTokenizer:
    """A tokenizer.json read by HF `tokenizers`; special tokens come from the model's config."""

    def __init__(self, path: str | os.PathLike, bos_id: int | None = None, eos_ids: Sequence[int] = ()):
        self._tok = tokenizers.Tokenizer.from_file(os.fspath(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        self._tok.save(os.path.join(ckpt_dir, "tokenizer.json"))


def load_tokenizer(
    ckpt_dir: str | os.PathLike, bos_id: int | None = None, eos_ids: Sequence[int] = ()
) -> Tokenizer | None:
    """The checkpoint's tokenizer: tokenizer.json if present, the byte tokenizer if
    tokenizer_config.json names `ByteTokenizer`, else None (token ids in, token ids out)."""
    path = os.path.join(ckpt_dir, "tokenizer.json")
    if os.path.exists(path):
        return HFTokenizer(path, bos_id, eos_ids)
    tc_path = os.path.join(ckpt_dir, "tokenizer_config.json")
    if os.path.exists(tc_path):
        with open(tc_path) as f:
            if json.load(f).get("tokenizer_class") == "ByteTokenizer":
                return ByteTokenizer()
    return None
