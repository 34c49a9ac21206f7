"""Tokenizers: HF `tokenizers` (a tokenizer.json) and a byte-level tokenizer.

Both expose the same small surface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_ids`, and `token_bytes()`: how many bytes of UTF-8 text each token
stands for (0 for special tokens), so that bits per byte compare across tokenizers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Protocol, Sequence

import numpy as np

import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers
import tokenizers.processors


log = logging.getLogger("jaxinfer")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def save(self, ckpt_dir: str | os.PathLike) -> None: ...

    def token_bytes(self) -> np.ndarray: ...


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

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32: 1 for each byte token, 0 for BOS and EOS."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        """Write the same tokenizer as an HF tokenizer.json (byte-level BPE with no merges)."""
        self.to_hf().save(os.path.join(ckpt_dir, "tokenizer.json"))

    def to_hf(self) -> tokenizers.Tokenizer:
        byte_chars = _bytes_to_unicode()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
        tok.add_special_tokens(["<s>", "</s>"])  # ids 256, 257
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", self.bos_id)]
        )
        return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by byte-level BPE tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


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

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32 bytes of text per token, read off the vocabulary: a byte-level BPE
        token's characters are one byte each; otherwise (SentencePiece-style) "<0xNN>" is one byte,
        "▁" a space, and other characters their UTF-8 length. Special tokens are 0."""
        decoder = json.dumps(json.loads(self._tok.to_str()).get("decoder"))
        byte_level = '"ByteLevel"' in decoder
        out = np.zeros(self.vocab_size, np.int32)
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in special or i >= self.vocab_size:
                continue
            if byte_level:
                out[i] = len(token)
            elif _BYTE_TOKEN.fullmatch(token):
                out[i] = 1
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def load_tokenizer(
    ckpt_dir: str | os.PathLike, bos_id: int | None = None, eos_ids: Sequence[int] = ()
) -> Tokenizer | None:
    """The checkpoint's tokenizer.json, or None (the model then takes and returns token ids; a
    warning says so at load rather than at the first string prompt)."""
    path = os.path.join(ckpt_dir, "tokenizer.json")
    if os.path.exists(path):
        return HFTokenizer(path, bos_id, eos_ids)
    log.warning("no tokenizer.json in %s: the model takes and returns token ids only", ckpt_dir)
    return None
