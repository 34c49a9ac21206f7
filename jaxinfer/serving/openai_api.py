"""OpenAI's completions and chat-completions wire format, over jaxinfer's requests and outputs.

`parse(body, kind, server)` checks a JSON request body field by field and returns the engine's
view of it (prompt token ids, SamplingParams, adapter); anything wrong raises RequestError naming
the field, which the server returns as HTTP 400 with OpenAI's error body. `response` renders a
finished RequestOutput, `ChunkWriter` a running request's outputs as stream chunks (one chunk per
engine output that brings tokens, so token by token at decode_steps=1 without speculation).

What the engine cannot do is refused, not ignored: `logprobs` (the sampler returns no
log-probabilities), `echo`, `best_of`, `suffix`, `logit_bias`, presence / frequency penalties,
and tools. Beside OpenAI's fields, `top_k`, `min_p` and `ignore_eos` are taken (as vLLM takes them).
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

from jaxinfer.engine.requests import RequestOutput, prepare_prompt
from jaxinfer.sampling.sampler import SamplingParams


class RequestError(ValueError):
    """A bad request: HTTP `status` with OpenAI's error body naming the offending field (`param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the names `model` may take, the tokenizer, the context."""

    name: str  # the base model's name
    adapters: tuple[str, ...]  # loaded LoRA adapters, selected by `model`
    tokenizer: Any  # jaxinfer.checkpoints.tokenizer.HFTokenizer (chat_template may be None)
    model: Any  # jaxinfer.Model, for prompt checks against its vocabulary and context
    max_seq_len: int


@dataclasses.dataclass(frozen=True)
class Parsed:
    kind: str  # "completion" | "chat"
    model: str
    adapter: str | None
    prompt: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage

    @property
    def prompt_field(self) -> str:
        return PROMPT_FIELD[self.kind]


UNSUPPORTED = {
    "logprobs": "logprobs are not supported: the sampler returns no token log-probabilities",
    "top_logprobs": "top_logprobs are not supported: the sampler returns no token log-probabilities",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "logit_bias": "logit_bias is not supported",
    "presence_penalty": "presence_penalty is not supported (only 0)",
    "frequency_penalty": "frequency_penalty is not supported (only 0)",
    "tools": "tools are not supported",
}
PROMPT_FIELD = {"completion": "prompt", "chat": "messages"}  # the field a request's prompt is in
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop")


def parse(body: Any, kind: str, served: ServedModel) -> Parsed:
    """A completions (kind "completion") or chat-completions ("chat") body, checked; RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, message in UNSUPPORTED.items():
        if not _unset(name, body.get(name)):
            raise RequestError(message, name)
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise RequestError("best_of is not supported", "best_of")
    model = body.get("model", served.name)
    if model != served.name and model not in served.adapters:
        known = ", ".join([served.name, *served.adapters])
        raise RequestError(f"the model {model!r} does not exist; this server has: {known}", "model")
    prompt, stop_ids = _completion_prompt(body, served) if kind == "completion" else _chat_prompt(body, served)
    field = PROMPT_FIELD[kind]
    if len(prompt) > served.max_seq_len:
        raise RequestError(f"{field} has {len(prompt)} tokens, over this model's context of {served.max_seq_len}",
                           field)
    default_max = 16 if kind == "completion" else max(1, served.max_seq_len - len(prompt))
    sampling = _sampling(body, kind, default_max, stop_ids)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")
    return Parsed(kind, model, None if model == served.name else model, prompt, sampling, stream, include_usage)


def _unset(name: str, value) -> bool:
    """An unsupported field left at its no-op value (null, false, empty; 0 for a penalty)."""
    if value is None or value is False or (isinstance(value, (dict, list)) and not value):
        return True
    return name.endswith("_penalty") and not isinstance(value, bool) and value == 0


def _typed(body: dict, name: str, kind, default, param: str | None = None):
    """body[name] if it has the type `kind` (a bool is no number), `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        expected = {int: "an integer", bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
        raise RequestError(f"{param or name} must be {expected.get(kind, 'a number')}, got {value!r}", param or name)
    return value


def _completion_prompt(body: dict, served: ServedModel) -> tuple[list[int], tuple[int, ...]]:
    """The prompt as token ids: a string, a list of token ids, or a list holding one of either."""
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RequestError("prompt must be a string, a list of token ids, or a list of one of either "
                           "(batched prompts are not supported)", "prompt")
    if not isinstance(prompt, (str, list)):
        raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    try:
        return prepare_prompt(served.model, prompt, "prompt"), ()
    except ValueError as e:
        raise RequestError(str(e), "prompt") from None


def _chat_prompt(body: dict, served: ServedModel) -> tuple[list[int], tuple[int, ...]]:
    """The conversation through the model's chat template, and the template's end-of-turn token
    (its eos_token, when that is one token) as a stop token."""
    messages = body.get("messages")
    if messages is None:
        raise RequestError("messages is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role", "messages")
        messages[i] = {**m, "content": _content(m.get("content"), i)}
    tok = served.tokenizer
    if tok.chat_template is None or not hasattr(tok, "apply_chat_template"):
        raise RequestError(f"the model {served.name!r} has no chat template: use /v1/completions", "messages")
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    if not ids:
        raise RequestError("messages render to an empty prompt", "messages")
    eot = getattr(tok, "special_tokens", {}).get("eos_token")
    eot_ids = tok.encode(eot, add_special_tokens=False) if eot else []
    return ids, tuple(eot_ids) if len(eot_ids) == 1 else ()


def _content(content, i: int) -> str:
    """A message's content as text: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _sampling(body: dict, kind: str, default_max: int, stop_ids: tuple[int, ...]) -> SamplingParams:
    """SamplingParams from the body; SamplingParams' own range checks name the field they refuse."""
    max_name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("stop must be a string or a list of strings", "stop")
    values = dict(
        max_tokens=_typed(body, max_name, int, default_max, max_name),
        temperature=float(_typed(body, "temperature", (int, float), 1.0)),
        top_p=float(_typed(body, "top_p", (int, float), 1.0)),
        top_k=_typed(body, "top_k", int, 0),
        min_p=float(_typed(body, "min_p", (int, float), 0.0)),
        seed=_typed(body, "seed", int, None),
        n=_typed(body, "n", int, 1),
        stop=tuple(stop or ()),
        ignore_eos=_typed(body, "ignore_eos", bool, False),
        stop_token_ids=stop_ids,
    )
    try:
        return SamplingParams(**values)
    except ValueError as e:
        field = re.match(r"\w*", str(e)).group()
        raise RequestError(str(e), max_name if field == "max_tokens" else field if field in SAMPLING_FIELDS else None)


def engine_error(e: ValueError, parsed: Parsed) -> RequestError:
    """The engine refused a request (ValueError from add_request): a 400 naming the field it concerns."""
    word = re.match(r"\w*", str(e)).group()
    param = word if word in SAMPLING_FIELDS else "model" if word == "adapter" else parsed.prompt_field
    return RequestError(str(e), param)


# Responses ---------------------------------------------------------------------------------------

def _finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason in OpenAI's words ("context" is a "length" stop); others as they are."""
    return "length" if reason == "context" else reason


def _samples(out: RequestOutput) -> list[RequestOutput]:
    return out.samples or [out]


def usage(out: RequestOutput) -> dict:
    done = sum(len(s.token_ids) for s in _samples(out))
    return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": done,
            "total_tokens": len(out.prompt_token_ids) + done}


def new_id(parsed: Parsed) -> str:
    return ("cmpl-" if parsed.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def response(parsed: Parsed, out: RequestOutput, rid: str) -> dict:
    """The body for a finished request; RequestError (HTTP 500) if the engine failed it."""
    if out.finish_reason == "error":
        raise RequestError(f"the request failed: {out.error}", None, status=500)
    choices = []
    for i, s in enumerate(_samples(out)):
        choice = {"index": i, "logprobs": None, "finish_reason": _finish_reason(s.finish_reason)}
        if parsed.kind == "completion":
            choice["text"] = s.text or ""
        else:
            choice["message"] = {"role": "assistant", "content": s.text or ""}
        choices.append(choice)
    return {"id": rid, "object": "text_completion" if parsed.kind == "completion" else "chat.completion",
            "created": int(time.time()), "model": parsed.model, "choices": choices, "usage": usage(out)}


class ChunkWriter:
    """A running request's outputs as stream chunks: per choice, the text and finish reason that
    are new since the last output."""

    def __init__(self, parsed: Parsed, rid: str):
        self.parsed, self.rid, self.created = parsed, rid, int(time.time())
        self.object = "text_completion" if parsed.kind == "completion" else "chat.completion.chunk"
        self.tokens: dict[int, int] = {}  # choice -> tokens sent
        self.text: dict[int, str] = {}  # choice -> text sent
        self.done: set[int] = set()  # choices whose finish reason was sent

    def chunks(self, out: RequestOutput) -> list[dict]:
        """The chunks for this output: one per choice that got tokens or finished since the last."""
        if out.finished and out.finish_reason == "error":
            raise RequestError(f"the request failed: {out.error}", None, status=500)
        chunks = []
        for i, s in enumerate(_samples(out)):
            if i in self.done or (len(s.token_ids) == self.tokens.get(i, 0) and s.finish_reason is None):
                continue
            sent = self.text.get(i, "")
            text = s.text or ""
            delta = text[len(sent):] if text.startswith(sent) else ""
            first = i not in self.tokens
            self.tokens[i], self.text[i] = len(s.token_ids), sent + delta
            reason = _finish_reason(s.finish_reason)
            if reason is not None:
                self.done.add(i)
            chunks.append(self._chunk(i, delta, reason, first))
        return chunks

    def _chunk(self, index: int, text: str, reason: str | None, first: bool) -> dict:
        if self.parsed.kind == "completion":
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        else:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.parsed.model,
                "choices": [choice]}

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.parsed.model,
                "choices": [], "usage": usage(out)}
