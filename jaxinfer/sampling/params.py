"""SamplingParams: how one request picks its tokens, checked when it is made.

Fields beyond the plain sampler (temperature, top-k, top-p, min-p) ask for a stage of the logits
processing (jaxinfer/sampling/processors.py) or for log-probabilities; a request that leaves them
at their defaults runs the same program as before they existed. Token ids are checked against the
model's vocabulary when a request reaches an engine (`processors.check`), since the vocabulary is
not known here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxinfer.structured.spec import StructuredOutput

MAX_LOGPROBS = 20  # top alternatives a request may ask for per token (OpenAI's and vLLM's limit)
MAX_BIAS = 100.0  # |logit_bias| limit (OpenAI's)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| limit (OpenAI's)
# repetition_penalty's range: float32's (the sampler divides by it in float32; 0 or inf there make NaN rows)
REPETITION_PENALTY_RANGE = (1e-37, float(np.finfo(np.float32).max))
LOGPROBS_MODES = ("raw", "processed")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _token_ids(name: str, value) -> tuple[int, ...]:
    """A sequence of token ids (each >= 0) as a tuple; ValueError naming `name` otherwise."""
    if isinstance(value, (str, bytes)) or _is_int(value) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of token ids, got {value!r}")
    ids = tuple(value)
    if not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"{name} must hold integer token ids >= 0, got {list(ids)!r}")
    return tuple(int(t) for t in ids)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature=0 is greedy (argmax of the processed logits).

    Processing, applied in this order before temperature and the top-k / top-p / min-p cuts:
      allowed_token_ids   only these tokens may be drawn (None: all)
      bad_token_ids       these tokens are never drawn
      min_tokens          EOS (unless ignore_eos) and stop_token_ids are banned, and stop strings not
                          checked, until this many tokens are generated
      logit_bias          {token id: bias} added to the logits, each bias in [-100, 100]
      repetition_penalty  HF's / vLLM's: the logit of every token in the prompt or the output so far
                          is divided by it where positive, multiplied where negative (1: none)
      frequency_penalty   OpenAI's: subtracted once per occurrence of the token in the output so far
      presence_penalty    OpenAI's: subtracted once if the token occurs in the output so far
    logprobs: None, or N in [0, 20]: each generated token's log-probability and the N most likely
    alternatives; logprobs_mode "raw" (the model's log-softmax, what HF's log_softmax(logits) gives)
    or "processed" (the distribution the token was drawn from: after processing, temperature and
    the cuts). prompt_logprobs: None, or N in [0, 20]: the log-probability of every prompt token
    after the first under the model (always the raw log-softmax: no processing applies to the
    prompt) and its N most likely alternatives. extra_args: {name: value} for processors registered outside the library
    (jaxinfer.sampling.processors.register); a name no processor claims is refused by the engine.
    structured: a StructuredOutput (JSON schema, JSON object, regex, choice or Lark grammar) the
    output must follow: each token is drawn from those the constraint allows next (EOS only where
    it may end), and the request ends ("stop") when the constraint is complete. Checked against the
    model's tokenizer when the request reaches an engine (ValueError naming the field).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob, in [0, 1]
    seed: int | None = None  # None: derived from the request's index
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded completion
    ignore_eos: bool = False
    n: int = 1  # independent samples of the same prompt (they share its KV pages)
    timeout_s: float | None = None  # deadline from arrival; then it ends with finish_reason "timeout"
    logit_bias: Mapping[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    bad_token_ids: tuple[int, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None
    logprobs_mode: str = "raw"
    prompt_logprobs: int | None = None
    extra_args: Mapping[str, Any] | None = None
    structured: StructuredOutput | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        check_timeout("timeout_s", self.timeout_s)
        if isinstance(self.stop, str) or isinstance(self.stop_token_ids, int):
            raise ValueError("stop and stop_token_ids must be sequences, not a single value")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self._check_processing()

    def _check_processing(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be integer token ids >= 0, got {token!r}")
                if not _is_number(bias) or abs(bias) > MAX_BIAS:
                    raise ValueError(f"logit_bias[{token}] must be a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                                     f"got {bias!r}")
            object.__setattr__(self, "logit_bias", {int(t): float(b) for t, b in self.logit_bias.items()} or None)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or abs(value) > MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not _is_number(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none) within float32's range "
                             f"[{low:.4g}, {high:.4g}], got {self.repetition_penalty!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        object.__setattr__(self, "bad_token_ids", _token_ids("bad_token_ids", self.bad_token_ids))
        if self.allowed_token_ids is not None:
            allowed = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                raise ValueError("allowed_token_ids must hold at least one token id (None: every token)")
            object.__setattr__(self, "allowed_token_ids", allowed)
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (_is_int(self.prompt_logprobs)
                                                     and 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                             f"got {self.prompt_logprobs!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a jaxinfer.StructuredOutput, got {type(self.structured).__name__}")
        if self.structured is not None and self.min_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} cannot be combined with structured output: the constraint "
                             f"decides where the output may end (EOS is allowed only there)")
        if self.extra_args is not None:
            if not isinstance(self.extra_args, Mapping) or not all(isinstance(k, str) for k in self.extra_args):
                raise ValueError(f"extra_args must be a mapping with string keys, got {self.extra_args!r}")
            object.__setattr__(self, "extra_args", dict(self.extra_args))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_timeout(name: str, value) -> None:
    """A timeout is None or a number of seconds > 0; ValueError naming `name` otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                              or not value > 0):
        raise ValueError(f"{name} must be None or a number of seconds > 0, got {value!r}")
