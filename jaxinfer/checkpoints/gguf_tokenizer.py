"""The tokenizer of a GGUF file (llama.cpp's format), rebuilt from its metadata as HF transformers'
GGUF loader builds it (transformers/integrations/gguf/gguf_tokenizer_mapping.py)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers
import tokenizers.processors

from jaxinfer.checkpoints.tokenizer import HFTokenizer, bytes_to_unicode

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, the ones HF transformers' GGUF loader sets
# for the architectures read here (transformers/integrations/gguf/gguf_tokenizer_mapping.py); any
# other value keeps GPT-2's byte-level split, as HF does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def tokenizer_from_metadata(meta: dict[str, Any], eos_ids: Sequence[int]) -> HFTokenizer | None:
    """The GGUF's tokenizer as HF transformers' GGUF loader builds it: a byte-level BPE (GPT-2's
    `tokenizers` setup) over the file's vocabulary and merges, the file's split pattern for known
    `tokenizer.ggml.pre` values, control tokens special, user-defined tokens added whole, and BOS /
    EOS added as `tokenizer.ggml.add_bos_token` / `add_eos_token` say. None (with a warning) for a
    vocabulary of another kind (sentencepiece, unigram): the model then takes and returns token ids."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        warnings.warn(f"tokenizer.ggml.model={kind!r} is not read (only 'gpt2', byte-level BPE): the model has no "
                      "tokenizer and takes token ids", stacklevel=3)
        return None
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[spelled] = i
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
    ))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = tokenizers.decoders.ByteLevel()

    def special(name: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{name}")
        return None if token_id is None else tokens[int(token_id)]

    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= alphabet]
    keys = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"))
    named = {name: special(key) for name, key in keys}
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(control + [t for t in named.values() if t is not None])])
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if user:
        tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in user])

    bos, eos = named["bos_token"], named["eos_token"]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None

    def sequence(seq: str, type_id: int) -> str:  # "[bos] $A [eos]" as TemplateProcessing spells it
        return " ".join([f"{bos}:{type_id}"] * add_bos + [f"${seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos)

    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys([bos] * add_bos + [eos] * add_eos)],
    )
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    return HFTokenizer(tok, bos_id=None if bos_id is None else int(bos_id), eos_ids=eos_ids,
                       chat_template=meta.get("tokenizer.chat_template"),
                       special_tokens={k: v for k, v in named.items() if v is not None})
