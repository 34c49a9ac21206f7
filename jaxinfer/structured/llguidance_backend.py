"""The llguidance backend (the default): a Rust library whose matchers compute a token mask by
walking the tokenizer's trie with an Earley parser over the constraint's grammar, so a JSON
schema, a regex, a choice and a Lark grammar all become one kind of grammar.

The tokenizer comes from the model's own: its HF `tokenizers` JSON (a tokenizer.json, the one a
GGUF's vocabulary builds, or the byte-level tiny tokenizer written as one), with the model's
vocabulary size (rows past the tokenizer's are never allowed) and end-of-sequence ids.
"""

from __future__ import annotations

import json

import llguidance
import numpy as np

from jaxinfer.structured.spec import StructuredOutput, escape_regex

_JSON_OBJECT = {"type": "object"}
# JSON without free whitespace between tokens (separators "," and ":"): a model cannot wander into
# whitespace, and outputs are the compact JSON a parser reads. A schema's own "x-guidance" options
# (llguidance's JsonCompileOptions, e.g. {"whitespace_flexible": true}) override it.
JSON_OPTIONS = {"whitespace_flexible": False}


class LLGuidanceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher, words: int):
        self._m, self._words = matcher, words

    def advance(self, token: int) -> bool:
        return bool(self._m.consume_token(int(token)))

    def fill(self, words: np.ndarray) -> None:
        """words (W,) int32, C-contiguous, W >= the tokenizer's words: overwritten with the mask."""
        if words.dtype != np.int32 or not words.flags["C_CONTIGUOUS"] or words.shape[0] < self._words:
            raise ValueError(f"a mask row must be C-contiguous int32 of >= {self._words} words, got "
                             f"{words.dtype} {words.shape}")
        words[self._words:] = 0
        self._m.unsafe_compute_mask_ptr(words.ctypes.data, self._words * 4)

    def rollback(self, n: int) -> None:
        if n and not self._m.rollback(n):
            raise ValueError(f"cannot roll the matcher back {n} tokens: {self._m.get_error()}")

    @property
    def complete(self) -> bool:
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    def fork(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._m.deep_copy(), self._words)


class LLGuidanceBackend:
    """tokenizer_json: the model's tokenizer as HF `tokenizers` JSON; vocab_size: the model's (the
    logits' width); eos_ids: the ids that end a sequence."""

    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids):
        if not eos_ids:
            raise ValueError("structured output needs the model's end-of-sequence token id (none is known)")
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        if self.tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, over the model's "
                             f"vocabulary of {vocab_size}")
        self.vocab_size = vocab_size

    def compile(self, spec: StructuredOutput) -> str:
        """The llguidance grammar of a constraint; ValueError with llguidance's reason if invalid."""
        grammar = grammar_text(spec)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error.strip())
        return grammar

    def matcher(self, grammar: str) -> LLGuidanceMatcher:
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return LLGuidanceMatcher(m, -(-self.tokenizer.vocab_size // 32))


def grammar_text(spec: StructuredOutput) -> str:
    """A constraint as llguidance's grammar text."""
    field = spec.field
    if field == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec.json_schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(str(e)) from None
    if field == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_JSON_OBJECT, defaults=JSON_OPTIONS)
    if field == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if field == "choice":
        return llguidance.LLMatcher.grammar_from_regex("|".join(f"({escape_regex(c)})" for c in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)
