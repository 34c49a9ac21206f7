"""The xgrammar backend (optional: `pip install 'jaxinfer[structured-xgrammar]'`; its wheel needs
torch and transformers): vLLM's and SGLang's default. A pushdown automaton per grammar, compiled
with per-state token masks precomputed for the tokenizer; the matcher's masks are torch tensors,
here views of the numpy rows the engine hands it.

JSON is compact as in the llguidance backend (separators "," and ":", no free whitespace). The
tokenizer comes from the model's own HF `tokenizers` JSON, wrapped as a transformers fast
tokenizer for xgrammar's TokenizerInfo.
"""

from __future__ import annotations

import importlib
import json

import numpy as np

from jaxinfer.structured.spec import StructuredOutput, escape_regex

# Imported when the backend is first built: importing torch costs seconds, and `import jaxinfer`
# must not pay for an optional backend.
_MODULES = ("tokenizers", "torch", "transformers", "xgrammar")


class XGrammarMatcher:
    def __init__(self, matcher, words: int, eos_ids: frozenset[int], torch):
        self._m, self._words, self._eos, self._torch = matcher, words, eos_ids, torch
        self._mask = np.zeros(words, np.int32)  # the mask of the next position, filled on demand
        self._fresh = False
        self._error: str | None = None

    def advance(self, token: int) -> bool:
        self._fresh = False
        if self._error is None and not self._m.accept_token(int(token)):
            self._error = f"token {token} does not satisfy the grammar"
        return self._error is None

    def _next_mask(self) -> np.ndarray:
        if not self._fresh:
            self._m.fill_next_token_bitmask(self._torch.from_numpy(self._mask[None]))
            self._fresh = True
        return self._mask

    def fill(self, words: np.ndarray) -> None:
        words[self._words:] = 0
        words[: self._words] = self._next_mask()

    def rollback(self, n: int) -> None:
        self._fresh = False
        self._m.rollback(n)

    @property
    def complete(self) -> bool:
        """The grammar is matched and nothing but a stop token may follow."""
        if not self._m.is_completed():
            return False
        mask = self._next_mask().view(np.uint32).copy()
        for t in self._eos:
            mask[t // 32] &= ~np.uint32(1 << (t % 32))
        return not mask.any()

    @property
    def error(self) -> str | None:
        return self._error

    def fork(self) -> XGrammarMatcher:
        twin = XGrammarMatcher(self._m.fork(), self._words, self._eos, self._torch)
        twin._error = self._error
        return twin


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids):
        try:
            tokenizers, self._torch, transformers, self._xgr = (importlib.import_module(m) for m in _MODULES)
        except ImportError as e:
            raise ValueError(f"the xgrammar backend needs {e.name}: pip install 'jaxinfer[structured-xgrammar]'") \
                from None
        if not eos_ids:
            raise ValueError("structured output needs the model's end-of-sequence token id (none is known)")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json))
        self.eos_ids = frozenset(eos_ids)
        info = self._xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self.compiler = self._xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def compile(self, spec: StructuredOutput):
        """The compiled grammar; ValueError with xgrammar's reason if it does not compile."""
        c = self.compiler
        try:
            if spec.field in ("json_schema", "json_object"):
                schema = {"type": "object"} if spec.field == "json_object" else spec.json_schema
                return c.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
            if spec.field == "regex":
                return c.compile_regex(spec.regex)
            if spec.field == "choice":
                return c.compile_regex("|".join(f"({escape_regex(ch)})" for ch in spec.choice))
            return c.compile_lark(spec.grammar)
        except (RuntimeError, ValueError) as e:
            raise ValueError(str(e).strip()) from None

    def matcher(self, compiled) -> XGrammarMatcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(compiled), -(-self.vocab_size // 32), self.eos_ids,
                               self._torch)
