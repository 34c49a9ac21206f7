"""OpenAI's completions and chat-completions wire format, over jaxinfer's requests and outputs.

`parse(request, kind, served, adapters)` takes a body already checked by its pydantic model
(jaxinfer/serving/schema.py: types, ranges, lengths, refused fields) and returns the engine's view
of it (prompt token ids, SamplingParams, adapter); what only the model can tell (the `model` name,
the prompt's tokens against the context and the vocabulary, the chat template's verdict) raises
RequestError naming the field, which the server returns as HTTP 400 with OpenAI's error body.
`response` renders a finished RequestOutput, `ChunkWriter` a running request's outputs as stream
chunks (one chunk per engine output that brings tokens, so token by token at decode_steps=1
without speculation).

Log-probabilities (the model's raw log-softmax, jaxinfer.sampling) come as OpenAI shapes them: for
completions `logprobs: {tokens, token_logprobs, top_logprobs, text_offset}` (top_logprobs: the N
most likely tokens and the drawn one, by their text), for chat `logprobs: {content: [{token,
logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`, in each stream chunk for its new
tokens. A token's text is its own decoding (a byte-level token that is part of a character decodes
to U+FFFD; its `bytes` are that text's UTF-8), and a log-probability of -inf is sent as -9999.0.
With completions' `echo` the prompt comes first, in the text and in the logprobs object (its first
token's entries null, as OpenAI and vLLM send them; `max_tokens: 0` sends the prompt alone: the
engine draws one token, which is dropped); vLLM's `prompt_logprobs` adds each choice's
`prompt_logprobs` list. Both are refused with `stream`. Prompt log-probabilities are the raw
log-softmax, computed over the whole prompt (jaxinfer.SamplingParams.prompt_logprobs).

Limits: a prompt longer than the context is refused (400 naming the prompt and both lengths); a
prompt that fits but leaves less room than max_tokens runs until the context is full, and ends
with finish_reason "length" (the engine's "context": OpenAI has no such reason).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel

from jaxinfer.engine.requests import RequestOutput, prepare_prompt
from jaxinfer.sampling.sampler import SamplingParams
from jaxinfer.serving.schema import RequestError
from jaxinfer.structured import StructuredOutput


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
    tokenizer: Any = None  # the served tokenizer: the text of each token of a logprobs answer
    echo: bool = False  # completions: the prompt before the completion (text and logprobs)
    no_tokens: bool = False  # completions' max_tokens 0 (with echo): the one token the engine draws is dropped
    prompt_text: str = ""  # the prompt as text (echo)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: each choice's, with this many alternatives
    structured_field: str | None = None  # the path of the request field the structured output constraint came from

    @property
    def prompt_field(self) -> str:
        return PROMPT_FIELD[self.kind]


PROMPT_FIELD = {"completion": "prompt", "chat": "messages"}  # the field a request's prompt is in
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "logprobs", "top_logprobs",
                   "prompt_logprobs")


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
    echo = kind == "completion" and bool(request.echo)
    if kind == "completion":
        _check_echo(request, echo)
    structured, structured_field = _structured(request)
    sampling = _sampling(request, kind, default_max, stop_ids, served.timeout_s, structured)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    prompt_text = "" if not echo else request.prompt if isinstance(request.prompt, str) else \
        served.tokenizer.decode(prompt)
    return Parsed(kind, model, None if model == served.name else model, prompt, sampling, bool(request.stream),
                  include_usage, served.tokenizer, echo=echo, no_tokens=kind == "completion" and request.max_tokens == 0,
                  prompt_text=prompt_text, prompt_logprobs=request.prompt_logprobs if kind == "completion" else None,
                  structured_field=structured_field)


def _structured(request: BaseModel) -> tuple[StructuredOutput | None, str | None]:
    """The constraint of response_format or structured_outputs (not both), and the field it is in."""
    fmt, vllm = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and vllm is not None:
        raise RequestError("response_format and structured_outputs both ask for structured output: send one",
                           "structured_outputs")
    if fmt is not None and fmt.type == "json_object":
        return StructuredOutput(json_object=True), "response_format"
    if fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        return StructuredOutput(json_schema={} if schema is None else schema), "response_format.json_schema.schema"
    if vllm is None:
        return None, None
    given = {"json_schema" if k == "json_" else k: v for k, v in vllm if v is not None}
    if len(given) != 1:
        raise RequestError(f"structured_outputs must set exactly one of json, regex, choice, grammar; got "
                           f"{len(given)}", "structured_outputs")
    (name, value), = given.items()
    field = f"structured_outputs.{'json' if name == 'json_schema' else name}"
    try:
        return StructuredOutput(**{name: value}), field
    except ValueError as e:
        raise RequestError(f"{field}: {e}", "structured_outputs") from None


def _check_echo(request: BaseModel, echo: bool) -> None:
    """The checks between completions' echo, max_tokens, min_tokens, stream and prompt_logprobs."""
    if request.max_tokens == 0 and not echo:
        raise RequestError("max_tokens: 0 needs echo: true (the prompt's log-probabilities alone)", "max_tokens")
    if request.max_tokens == 0 and request.min_tokens:
        raise RequestError(f"min_tokens={request.min_tokens} is over max_tokens=0", "min_tokens")
    for field in ("echo", "prompt_logprobs"):
        if request.stream and getattr(request, field) not in (None, False):
            raise RequestError(f"{field} is not supported with stream: true", field)


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
              timeout_s: float | None, structured: StructuredOutput | None = None) -> SamplingParams:
    """SamplingParams from the request; SamplingParams' own range checks name the field they refuse."""
    max_name = "max_completion_tokens" if kind == "chat" and request.max_completion_tokens is not None \
        else "max_tokens"
    max_tokens = getattr(request, max_name)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if kind == "chat" and request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = request.logprobs if kind == "completion" else (request.top_logprobs or 0) if request.logprobs else None
    prompt_logprobs = None
    if kind == "completion":  # echo's prompt part and vLLM's field share one ask: the larger
        asks = [n for n in (request.logprobs if request.echo else None, request.prompt_logprobs) if n is not None]
        prompt_logprobs = max(asks) if asks else None
    values = dict(
        max_tokens=default_max if max_tokens is None else max(max_tokens, 1),  # 0 (echo): one token, dropped
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
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        logit_bias={int(t): b for t, b in request.logit_bias.items()} if request.logit_bias else None,
        min_tokens=request.min_tokens or 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured=structured,
    )
    try:
        return SamplingParams(**values)
    except ValueError as e:
        field = re.match(r"\w*", str(e)).group()
        raise RequestError(str(e), max_name if field == "max_tokens" else field if field in SAMPLING_FIELDS else None)


def engine_error(e: ValueError, parsed: Parsed) -> RequestError:
    """The engine refused a request (ValueError from add_request): a 400 naming the field it concerns."""
    word = re.match(r"\w*", str(e)).group()
    if word == "structured" and parsed.structured_field is not None:
        return RequestError(f"{parsed.structured_field}: {e}", parsed.structured_field.split(".")[0])
    param = word if word in SAMPLING_FIELDS else "model" if word == "adapter" else parsed.prompt_field
    return RequestError(str(e), param)


# Responses ---------------------------------------------------------------------------------------

def _finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason in OpenAI's words ("context" is a "length" stop); others as they are."""
    return "length" if reason == "context" else reason


def _samples(out: RequestOutput) -> list[RequestOutput]:
    return out.samples or [out]


def usage(out: RequestOutput, no_tokens: bool = False) -> dict:
    """OpenAI's usage object (no_tokens: max_tokens 0, the engine's one token dropped)."""
    done = 0 if no_tokens else sum(len(s.token_ids) for s in _samples(out))
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
        tokens, logprobs, text = s.token_ids, s.logprobs, s.text or ""
        if parsed.no_tokens:
            tokens, logprobs, text = [], None if logprobs is None else [], ""
        prompt = (out.prompt_token_ids, s.prompt_logprobs) if parsed.echo else None
        choice = {"index": i, "logprobs": _logprobs(parsed, tokens, logprobs, prompt=prompt),
                  "finish_reason": "length" if parsed.no_tokens else _finish_reason(s.finish_reason)}
        if parsed.kind == "completion":
            choice["text"] = parsed.prompt_text + text
            if parsed.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(parsed, out.prompt_token_ids, s.prompt_logprobs)
        else:
            choice["message"] = {"role": "assistant", "content": s.text or ""}
        choices.append(choice)
    return {"id": rid, "object": "text_completion" if parsed.kind == "completion" else "chat.completion",
            "created": int(time.time()), "model": parsed.model, "choices": choices,
            "usage": usage(out, parsed.no_tokens)}


def _value(x: float) -> float:
    """A log-probability as sent: -inf as -9999.0 (JSON has no infinity)."""
    return max(x, -9999.0)


def _vllm_prompt_logprobs(parsed: Parsed, prompt: list[int], logprobs: list) -> list:
    """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the token and its most likely alternatives (ranks 1, 2, ...)."""
    decode, N = parsed.tokenizer.decode, parsed.prompt_logprobs

    def entry(x: float, rank: int | None, t: int) -> dict:
        return {"logprob": _value(x), "rank": rank, "decoded_token": decode([t])}

    return [None if lp is None else {**{str(a): entry(x, r + 1, a) for r, (a, x) in enumerate(lp.top[:N])},
                                     str(t): entry(lp.logprob, lp.rank, t)}
            for t, lp in zip(prompt, logprobs)]


def _logprobs(parsed: Parsed, tokens: list[int], logprobs: list | None, offset: int = 0,
              prompt: tuple[list[int], list] | None = None) -> dict | None:
    """OpenAI's logprobs object for these generated tokens and their Logprobs (None: not asked);
    completions' text offsets count from `offset`; with `prompt` (echo: its token ids and their
    Logprobs, None for the first), the prompt's tokens come first, the first one's entries null."""
    if logprobs is None:
        return None
    decode, N, value = parsed.tokenizer.decode, parsed.sampling.logprobs, _value

    def text(t: int) -> str:
        return decode([t])

    if parsed.kind == "chat":
        def entry(t: int, x: float) -> dict:
            return {"token": text(t), "logprob": value(x), "bytes": list(text(t).encode())}

        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, x) for a, x in lp.top[:N]]}
                            for t, lp in zip(tokens, logprobs)]}
    pairs = list(zip(*prompt)) + list(zip(tokens, logprobs)) if prompt else list(zip(tokens, logprobs))
    texts = [text(t) for t, _ in pairs]
    offsets = list(itertools.accumulate((len(x) for x in texts[:-1]), initial=offset)) if texts else []
    return {"tokens": texts, "token_logprobs": [None if lp is None else value(lp.logprob) for _, lp in pairs],
            "top_logprobs": [None if lp is None else {**{text(a): value(x) for a, x in lp.top[:N]},
                                                      text(t): value(lp.logprob)} for t, lp in pairs],
            "text_offset": offsets}


class ChunkWriter:
    """A running request's outputs as stream chunks: per choice, the text and finish reason that
    are new since the last output."""

    def __init__(self, parsed: Parsed, rid: str):
        self.parsed, self.rid, self.created = parsed, rid, int(time.time())
        self.object = "text_completion" if parsed.kind == "completion" else "chat.completion.chunk"
        self.tokens: dict[int, int] = {}  # choice -> tokens sent
        self.text: dict[int, str] = {}  # choice -> text sent
        self.offset: dict[int, int] = {}  # choice -> characters of the tokens sent (completions' text_offset)
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
            first, start = i not in self.tokens, self.tokens.get(i, 0)
            new = s.token_ids[start:]
            logprobs = _logprobs(self.parsed, new, None if s.logprobs is None else s.logprobs[start:],
                                 self.offset.get(i, 0))
            if logprobs is not None and self.parsed.kind == "completion":
                self.offset[i] = self.offset.get(i, 0) + sum(len(x) for x in logprobs["tokens"])
            self.tokens[i], self.text[i] = len(s.token_ids), sent + delta
            reason = _finish_reason(s.finish_reason)
            if reason is not None:
                self.done.add(i)
            chunks.append(self._chunk(i, delta, reason, first, logprobs))
        return chunks

    def _chunk(self, index: int, text: str, reason: str | None, first: bool, logprobs: dict | None) -> dict:
        if self.parsed.kind == "completion":
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        else:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.parsed.model,
                "choices": [choice]}

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.parsed.model,
                "choices": [], "usage": usage(out)}
