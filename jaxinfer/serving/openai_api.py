"""OpenAI's completions and chat-completions wire format, over jaxinfer's requests and outputs.

`parse(request, kind, served, adapters)` takes a body already checked by its pydantic model
(jaxinfer/serving/schema.py: types, ranges, lengths, refused fields) and returns the engine's view
of it (prompt token ids, SamplingParams, adapter); what only the model can tell (the `model` name,
the prompt's tokens against the context and the vocabulary, the chat template's verdict) raises
RequestError naming the field, which the server returns as HTTP 400 with OpenAI's error body.
`response` renders a finished RequestOutput, `ChunkWriter` a running request's outputs as stream
chunks (one chunk per engine output that brings tokens, so token by token at decode_steps=1
without speculation).

Limits: a prompt longer than the context is refused (400 naming the prompt and both lengths); a
prompt that fits but leaves less room than max_tokens runs until the context is full, and ends
with finish_reason "length" (the engine's "context": OpenAI has no such reason).
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel

from jaxinfer.engine.requests import RequestOutput, prepare_prompt
from jaxinfer.sampling.sampler import SamplingParams
from jaxinfer.serving.schema import RequestError


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the base model's name, the tokenizer, the context."""

    name: str  # the base model's name; `model` may also name an adapter the engine holds
    tokenizer: Any  # jaxinfer.checkpoints.tokenizer.HFTokenizer (chat_template may be None)
    model: Any  # jaxinfer.Model, for prompt checks against its vocabulary and context
    max_seq_len: int
    timeout_s: float | None = None  # each request's deadline (SamplingParams.timeout_s)


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


PROMPT_FIELD = {"completion": "prompt", "chat": "messages"}  # the field a request's prompt is in
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop")


def parse(request: BaseModel, kind: str, served: ServedModel, adapters: tuple[str, ...] = ()) -> Parsed:
    """A checked completions (kind "completion") or chat-completions ("chat") request as the
    engine's; `adapters` are the LoRA adapters `model` may name. RequestError if bad."""
    n = request.n or 1
    if kind == "completion" and request.best_of not in (None, 1, n):
        raise RequestError(f"best_of={request.best_of} is not supported (only 1 or n={n})", "best_of")
    model = request.model or served.name
    if model != served.name and model not in adapters:
        known = ", ".join([served.name, *adapters])
        raise RequestError(f"the model {model!r} does not exist; this server has: {known}", "model")
    prompt, stop_ids = _completion_prompt(request, served) if kind == "completion" else _chat_prompt(request, served)
    field = PROMPT_FIELD[kind]
    if len(prompt) > served.max_seq_len:
        raise RequestError(f"{field} has {len(prompt)} tokens, over this model's context of {served.max_seq_len}",
                           field)
    default_max = 16 if kind == "completion" else max(1, served.max_seq_len - len(prompt))
    sampling = _sampling(request, kind, default_max, stop_ids, served.timeout_s)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Parsed(kind, model, None if model == served.name else model, prompt, sampling, bool(request.stream),
                  include_usage)


def _completion_prompt(request: BaseModel, served: ServedModel) -> tuple[list[int], tuple[int, ...]]:
    """The prompt as token ids (a string is tokenised here, its length already bounded)."""
    try:
        return prepare_prompt(served.model, request.prompt, "prompt"), ()
    except ValueError as e:
        raise RequestError(str(e), "prompt") from None


def _chat_prompt(request: BaseModel, served: ServedModel) -> tuple[list[int], tuple[int, ...]]:
    """The conversation through the model's chat template, and the template's end-of-turn token
    (its eos_token, when that is one token) as a stop token."""
    tok = served.tokenizer
    if tok.chat_template is None or not hasattr(tok, "apply_chat_template"):
        raise RequestError(f"the model {served.name!r} has no chat template: use /v1/completions", "messages")
    messages = []
    for m in request.messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        messages.append({"role": m.role, "content": text, **({"name": m.name} if m.name is not None else {})})
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    if not ids:
        raise RequestError("messages render to an empty prompt", "messages")
    eot = getattr(tok, "special_tokens", {}).get("eos_token")
    eot_ids = tok.encode(eot, add_special_tokens=False) if eot else []
    return ids, tuple(eot_ids) if len(eot_ids) == 1 else ()


def _sampling(request: BaseModel, kind: str, default_max: int, stop_ids: tuple[int, ...],
              timeout_s: float | None) -> SamplingParams:
    """SamplingParams from the request; SamplingParams' own range checks name the field they refuse."""
    max_name = "max_completion_tokens" if kind == "chat" and request.max_completion_tokens is not None \
        else "max_tokens"
    max_tokens = getattr(request, max_name)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    values = dict(
        max_tokens=default_max if max_tokens is None else max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        seed=request.seed,
        n=request.n or 1,
        stop=tuple(stop or ()),
        ignore_eos=bool(request.ignore_eos),
        stop_token_ids=stop_ids,
        timeout_s=timeout_s,
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
