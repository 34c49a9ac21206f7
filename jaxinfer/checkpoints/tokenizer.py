"""Tokenizers: HF `tokenizers` (a tokenizer.json, or one built from a GGUF's vocabulary) and a
byte-level tokenizer.

Both expose the same small surface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_ids`, `chat_template` (None when the model has none), and
`token_bytes()`: how many bytes of UTF-8 text each token stands for (0 for special tokens), so that
bits per byte compare across tokenizers. An HFTokenizer with a chat template renders conversations
with `apply_chat_template`, in a sandboxed jinja2 environment set up as HF transformers sets it up
(trim_blocks, lstrip_blocks, loop controls, the `tojson` filter without HTML escaping,
`raise_exception`, `strftime_now`, special tokens by name).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
from typing import Any, Protocol, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers
import tokenizers.processors

from jaxinfer.models.config import read_json_object

log = logging.getLogger("jaxinfer")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def save(self, ckpt_dir: str | os.PathLike) -> None: ...

    def to_json(self) -> str: ...

    def token_bytes(self) -> np.ndarray: ...


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255), then BOS (256) and EOS (257)."""

    vocab_size = 258
    bos_id = 256
    eos_ids = (257,)
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32: 1 for each byte token, 0 for BOS and EOS."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)

    def to_json(self) -> str:
        """The same tokenizer as HF `tokenizers` JSON (what a grammar backend builds its tables from)."""
        return self.to_hf().to_str()

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        """Write the same tokenizer as an HF tokenizer.json (byte-level BPE with no merges)."""
        self.to_hf().save(os.path.join(ckpt_dir, "tokenizer.json"))

    def to_hf(self) -> tokenizers.Tokenizer:
        byte_chars = bytes_to_unicode()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
        tok.add_special_tokens(["<s>", "</s>"])  # ids 256, 257
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", self.bos_id)]
        )
        return tok


def bytes_to_unicode() -> dict[int, str]:
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
    """An HF `tokenizers` tokenizer; BOS / EOS ids come from the model's config, and the chat
    template and its special tokens by name ({"bos_token": "<s>", ...}) from the checkpoint."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int | None = None, eos_ids: Sequence[int] = (),
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self._tok = tokenizer
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos_id: int | None = None, eos_ids: Sequence[int] = (),
                  chat_template: str | None = None, special_tokens: dict[str, str] | None = None) -> HFTokenizer:
        """A tokenizer.json; ValueError naming the file if `tokenizers` cannot read it."""
        try:
            tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
            raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
        return cls(tokenizer, bos_id, eos_ids, chat_template, special_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as HF `tokenizers` JSON (what a grammar backend builds its tables from)."""
        return self._tok.to_str()

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """The conversation rendered by the model's chat template (HF transformers' rendering):
        text, or with `tokenize` its token ids, encoded without adding BOS / EOS (the template
        writes the special tokens it wants). `kwargs` reach the template as variables."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        if isinstance(messages, (str, dict)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        try:
            text = _compile_template(self.chat_template).render(
                messages=list(messages), tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a render error
            raise ValueError(f"chat_template refused the messages: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

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


    def save(self, ckpt_dir: str | os.PathLike) -> None:
        """tokenizer.json, and with a chat template a tokenizer_config.json holding it and the
        special tokens (as HF transformers writes them, so both read it back)."""
        self._tok.save(os.path.join(ckpt_dir, "tokenizer.json"))
        if self.chat_template is not None:
            with open(os.path.join(ckpt_dir, _CONFIG_FILE), "w") as f:
                json.dump({"chat_template": self.chat_template, **self.special_tokens}, f, indent=2)


_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@functools.lru_cache(maxsize=8)
def _compile_template(chat_template: str) -> jinja2.Template:
    """The template in HF transformers' environment (utils/chat_template_utils.py), without its
    `{% generation %}` tag (assistant-token masks for training)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template does not parse: {e}") from e


def _read_chat_template(ckpt_dir: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """The chat template and named special tokens of an HF checkpoint's tokenizer_config.json (or
    chat_template.jinja beside it); (None, {}) without one."""
    config: dict[str, Any] = {}
    path = os.path.join(ckpt_dir, _CONFIG_FILE)
    if os.path.exists(path):
        config = read_json_object(path, "tokenizer settings")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_path = os.path.join(ckpt_dir, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    special = {}
    for name in _SPECIAL_TOKEN_NAMES:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            special[name] = token
    return template, special


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def load_tokenizer(
    ckpt_dir: str | os.PathLike, bos_id: int | None = None, eos_ids: Sequence[int] = ()
) -> Tokenizer | None:
    """The checkpoint's tokenizer.json (with the chat template of its tokenizer_config.json), or
    None (the model then takes and returns token ids; a warning says so at load rather than at the
    first string prompt)."""
    path = os.path.join(ckpt_dir, "tokenizer.json")
    if os.path.exists(path):
        template, special = _read_chat_template(ckpt_dir)
        return HFTokenizer.from_file(path, bos_id, eos_ids, template, special)
    log.warning("no tokenizer.json in %s: the model takes and returns token ids only", ckpt_dir)
    return None
