"""Structured output: a request's output held to a JSON schema, a regex, a choice or a grammar.

spec.py        StructuredOutput, the constraint a request asks for (SamplingParams.structured)
backend.py     the backend interface (compile, matcher: advance, fill the bitmask, rollback,
               complete, fork) and Grammars (compiled constraints cached by text; matchers built
               on a thread pool)
llguidance_backend.py  the default backend
xgrammar_backend.py    the optional second (pip install 'jaxinfer[structured-xgrammar]')

The engine applies a constrained row's mask as the `grammar` logits processor
(jaxinfer/sampling/processors.py): filled on the host from the row's matcher before each token,
applied on the device before temperature, top-k and top-p.
"""

from jaxinfer.structured.backend import Backend, Grammars, Matcher
from jaxinfer.structured.llguidance_backend import LLGuidanceBackend, LLGuidanceMatcher
from jaxinfer.structured.spec import StructuredOutput
from jaxinfer.structured.xgrammar_backend import XGrammarBackend, XGrammarMatcher

BACKENDS = {"llguidance": LLGuidanceBackend, "xgrammar": XGrammarBackend}


def for_tokenizer(tokenizer, vocab_size: int, eos_ids, backend: str = "llguidance") -> Grammars:
    """Grammars for a model's tokenizer (a jaxinfer tokenizer with `to_json()`); the backend is
    built on first use. ValueError (then) for a model without a tokenizer."""
    if backend not in BACKENDS:
        raise ValueError(f"structured backend {backend!r} is not one of {sorted(BACKENDS)}")

    def make() -> Backend:
        if tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer; this model has none")
        return BACKENDS[backend](tokenizer.to_json(), vocab_size, eos_ids)

    return Grammars(make)


__all__ = ["BACKENDS", "Backend", "Grammars", "LLGuidanceBackend", "LLGuidanceMatcher", "Matcher",
           "StructuredOutput", "XGrammarBackend", "XGrammarMatcher", "for_tokenizer"]
