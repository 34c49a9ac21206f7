"""What one request may ask of the server, bounded before any work is done for it.

A request is refused at the cheapest point that can tell: its headers (the body's declared size,
the number of requests already held), the bytes of its body as they arrive, the JSON fields'
types, counts and lengths (before any tokenising), then its prompt's tokens against the context.

  limits = ServerLimits(max_body_bytes=4 << 20, max_concurrent_requests=256)
  chars = prompt_char_limit(max_seq_len, tokenizer)   # the characters a prompt may hold at most
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """The server's bounds on one request, and on how many it holds at once.

    The defaults admit any request a client of OpenAI's API sends in normal use (a prompt that
    fills a 128k-token context as text is under 1 MB) and refuse what only exhausts memory.
    """

    max_body_bytes: int = 4 << 20  # a bigger body gets 413, counted while it arrives
    max_prompt_chars: int | None = None  # None: max_seq_len times the longest token (prompt_char_limit)
    max_n: int = 16  # samples per request
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters in one stop string
    max_messages: int = 1024  # chat messages per request
    max_concurrent_requests: int = 256  # generation requests held at once (running or waiting); then 429
    retry_after_s: int = 1  # the Retry-After of a 429
    request_timeout_s: float | None = 600.0  # each request's deadline from arrival (finish_reason "timeout")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in ("max_prompt_chars", "request_timeout_s"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{field.name} must be a number > 0, got {value!r}")
            if field.name != "request_timeout_s" and not isinstance(value, int):
                raise ValueError(f"{field.name} must be an integer, got {value!r}")


def longest_token_chars(tokenizer) -> int:
    """The most characters of text one token of `tokenizer` can stand for: the most bytes of text of a
    token (a token of k bytes holds at most k characters), or the longest token decoded alone, which
    counts special tokens too (a prompt's text "<|im_start|>" may become one token)."""
    decoded = max(len(tokenizer.decode([i], skip_special_tokens=False)) for i in range(tokenizer.vocab_size))
    return max(1, decoded, int(tokenizer.token_bytes().max()))


def prompt_char_limit(max_seq_len: int, tokenizer, limits: ServerLimits) -> int:
    """The characters a prompt (or a chat's contents together) may have: limits.max_prompt_chars, or
    else max_seq_len times the longest token, the most text that can fit in the context. A longer
    prompt is refused without tokenising it."""
    if limits.max_prompt_chars is not None:
        return limits.max_prompt_chars
    return max_seq_len * longest_token_chars(tokenizer)
