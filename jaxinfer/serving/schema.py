"""The request bodies of /v1/completions and /v1/chat/completions as pydantic models, and the
error a bad body gets.

`request_models(limits, max_seq_len, vocab_size, prompt_chars)` builds the two models for one
server, its limits written into them, so the same objects check every body and describe it in the
server's /openapi.json (field, type, range, length). They are strict: a field the server does not
know is refused (`extra="forbid"`), a number is not taken from a string nor an integer from a bool
or a float, no float is NaN or infinite, and no string holds a lone surrogate. Lengths are checked
before anything is tokenised: a prompt's characters against `prompt_chars`, token-id lists against
the context, and the lists of stop strings and messages against their limits. Every list is checked
for its length before its items and stops at its first bad item, so no body makes work in
proportion to its size beyond parsing it.

Fields OpenAI defines that the engine cannot do yet (UNSUPPORTED) are refused with a message
saying so, unless they hold their no-op value (`echo: false` for chat, `tool_choice: "none"`, ...).
Structured output: OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema",
"json_schema": {"name", "schema", "strict", "description"}}) and vLLM's `structured_outputs`
({"json" | "regex" | "choice" | "grammar": ...}, one of them); whether a schema or grammar compiles
is checked against the tokenizer after parsing (openai_api, the engine's grammars). The sampling fields are OpenAI's (`presence_penalty`, `frequency_penalty`,
`logit_bias` with token ids as string keys, `logprobs`: an integer for completions, true/false with
`top_logprobs` for chat; completions' `echo`, with `max_tokens: 0` allowed beside it) and vLLM's
(`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, completions' `prompt_logprobs`). Fields OpenAI defines that do not change what is
generated (IGNORED: `user`, `service_tier`, `parallel_tool_calls`) are accepted and ignored.
`validation_error` turns pydantic's errors into one RequestError naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jaxinfer.sampling.params import MAX_BIAS, MAX_LOGPROBS, MAX_PENALTY, REPETITION_PENALTY_RANGE
from jaxinfer.serving.limits import ServerLimits


class RequestError(ValueError):
    """A bad request: HTTP `status` with OpenAI's error body naming the offending field (`param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


UNSUPPORTED = {
    "echo": "echo is not supported by /v1/chat/completions (/v1/completions takes it)",
    "suffix": "suffix is not supported",
    "tools": "tools are not supported",
    "tool_choice": "tool_choice is not supported (only \"none\")",
    "functions": "functions are not supported",
    "function_call": "function_call is not supported",
    "store": "store is not supported: the server stores no completions",
    "metadata": "metadata is not supported: the server stores no completions",
    "modalities": "modalities are not supported: the server generates text",
    "audio": "audio is not supported",
    "prediction": "prediction (predicted outputs) is not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web_search_options are not supported",
}
NO_OP = {"tool_choice": "none"}  # beside null, false and empty
IGNORED = ("user", "service_tier", "parallel_tool_calls")


def _unset(name: str, value) -> bool:
    """An unsupported field left at its no-op value."""
    if value is None or value is False or (isinstance(value, (dict, list, str)) and not value):
        return True
    return NO_OP.get(name, ...) == value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="A last chunk with the request's usage.")


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, description="The schema's name (OpenAI's; not used).")
    description: str | None = Field(None, max_length=1024, description="Accepted and ignored.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the output follows "
                                           "(none: any JSON value).")
    strict: bool | None = Field(None, description="Accepted: the output always follows the schema.")


class ResponseFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema (an object, or its "
                                               "JSON text).")
    regex: str | None = Field(None, min_length=1, max_length=65536, description="A regular expression (Rust "
                              "syntax).")
    choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=65536)]],
                      Field(min_length=1, max_length=1024, fail_fast=True)] | None = None
    grammar: str | None = Field(None, min_length=1, max_length=65536, description="A Lark grammar "
                                "(llguidance's dialect).")


@dataclasses.dataclass(frozen=True)
class RequestModels:
    """The request models of one server: /v1/completions' and /v1/chat/completions'."""

    completion: type[BaseModel]
    chat: type[BaseModel]


def request_models(limits: ServerLimits, max_seq_len: int, vocab_size: int, prompt_chars: int) -> RequestModels:
    """The request models of a server with these limits, context and vocabulary."""
    Text = Annotated[str, Field(min_length=1, max_length=prompt_chars)]
    TokenId = Annotated[int, Field(ge=0, lt=vocab_size)]
    TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=max_seq_len, fail_fast=True)]
    Content = Annotated[str, Field(max_length=prompt_chars)]
    Stop = Annotated[str, Field(min_length=1, max_length=limits.max_stop_chars)]
    Probability = Annotated[float, Field(allow_inf_nan=False)]
    Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)]
    Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]

    class _Request(_Strict):
        model: str | None = Field(None, max_length=256, description="The base model's name or a LoRA adapter's "
                                  "(GET /v1/models); default the base model.")
        max_tokens: int | None = Field(None, ge=1, le=max_seq_len, description="Most tokens to generate; a "
                                       "request whose context fills first ends with finish_reason \"length\".")
        temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="0: greedy. Default 1.")
        top_p: Probability | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0, le=vocab_size, description="0: no top-k cut (vLLM's field).")
        min_p: Probability | None = Field(None, ge=0, le=1, description="vLLM's field.")
        seed: int | None = Field(None, ge=0, lt=2**32)
        n: int | None = Field(None, ge=1, le=limits.max_n, description="Independent samples of the prompt.")
        stop: Stop | Annotated[list[Stop], Field(max_length=limits.max_stop, fail_fast=True)] | None = None
        ignore_eos: bool | None = Field(None, description="Generate past end-of-sequence (vLLM's field).")
        presence_penalty: Penalty | None = Field(None, description="Subtracted from the logit of every token the "
                                                 "output holds (OpenAI's).")
        frequency_penalty: Penalty | None = Field(None, description="Subtracted once per occurrence of the token in "
                                                  "the output (OpenAI's).")
        repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                                 allow_inf_nan=False, description="Divides positive, "
                                                 "multiplies negative logits of tokens in the prompt or output "
                                                 "(vLLM's; 1: none).")
        logit_bias: Annotated[dict[str, Bias], Field(max_length=vocab_size, json_schema_extra={
            "propertyNames": {"pattern": "^[0-9]+$"}})] | None = Field(  # ids past the vocabulary: the validator
            None, description="{token id (a string): bias in [-100, 100]} added to the logits.")
        min_tokens: int | None = Field(None, ge=0, le=max_seq_len, description="Tokens generated before "
                                       "end-of-sequence, stop tokens and stop strings may end the output (vLLM's).")
        response_format: ResponseFormat | None = Field(None, description="OpenAI's: text, json_object or "
                                                       "json_schema.")
        structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: one of json, regex, "
                                                             "choice, grammar. Not with response_format.")

        @field_validator("logit_bias")
        @classmethod
        def _token_ids(cls, bias):
            for key in bias or {}:
                if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
                    raise PydanticCustomError("token_id", "keys must be token ids in [0, {vocab}), got '{key}'",
                                              {"vocab": vocab_size, "key": key[:20]})
            return bias
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
        service_tier: str | None = Field(None, max_length=32, description="Accepted and ignored (one tier).")
        parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")

        @model_validator(mode="before")
        @classmethod
        def _drop_no_ops(cls, data):
            """Unsupported fields at their no-op value are dropped; any other value is refused as an
            unknown field, and validation_error says why."""
            if isinstance(data, dict):
                return {k: v for k, v in data.items() if not (k in UNSUPPORTED and _unset(k, v))}
            return data

    class CompletionRequest(_Request):
        prompt: Text | TokenIds | Annotated[list[Text | TokenIds], Field(min_length=1, max_length=1)] = \
            Field(description="A string, a list of token ids, or a list holding one of either (one prompt per "
                  "request).")
        best_of: int | None = Field(None, ge=1, le=limits.max_n, description="Only 1 or n.")
        max_tokens: int | None = Field(None, ge=0, le=max_seq_len, description="Most tokens to generate (0 only "
                                       "with echo: the prompt's log-probabilities alone); a request whose context "
                                       "fills first ends with finish_reason \"length\".")
        logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Each generated token's "
                                     "log-probability and this many of the most likely alternatives (with echo, "
                                     "each prompt token's too).")
        echo: bool | None = Field(None, description="The prompt before the completion, in the text and (with "
                                  "logprobs) the log-probabilities, the first prompt token's null. Not with stream.")
        prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM's field: each "
                                            "choice's prompt_logprobs, per prompt token (null for the first) "
                                            "{token id: {logprob, rank, decoded_token}} for it and this many of "
                                            "the most likely alternatives. Not with stream.")

        @field_validator("prompt")
        @classmethod
        def _one_prompt(cls, prompt):
            """The prompt itself: a list holding one prompt is unwrapped."""
            return prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else prompt

    class TextContentPart(_Strict):
        type: Literal["text"]
        text: Content

    Parts = Annotated[list[TextContentPart], Field(max_length=limits.max_messages, fail_fast=True)]

    class ChatMessage(_Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Content | Parts = Field(description="Text, or a list of text parts.")
        name: str | None = Field(None, max_length=64, description="Passed to the chat template.")

    class ChatCompletionRequest(_Request):
        messages: list[ChatMessage] = Field(min_length=1, max_length=limits.max_messages, fail_fast=True)
        max_completion_tokens: int | None = Field(None, ge=1, le=max_seq_len, description="max_tokens' new name.")
        logprobs: bool | None = Field(None, description="Each generated token's log-probability.")
        top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="The most likely alternatives "
                                         "of each generated token (needs logprobs: true).")

        @field_validator("messages")
        @classmethod
        def _total_chars(cls, messages):
            total = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
                        for m in messages)
            if total > prompt_chars:
                raise PydanticCustomError("too_many_chars", "the contents hold {total} characters, over the limit "
                                          "of {limit}", {"total": total, "limit": prompt_chars})
            return messages

    return RequestModels(CompletionRequest, ChatCompletionRequest)


_TYPE_ERRORS = ("_type", "is_instance_of", "model_attributes_type", "union_tag_invalid")
WHAT = {  # what a field with several forms takes, for a value that fits none
    "prompt": "a string, a list of token ids, or a list holding one of either",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of text parts ({"type": "text", "text": ...})',
}


def validation_error(e: pydantic.ValidationError, models: RequestModels) -> RequestError:
    """pydantic's errors for a body as one RequestError (400): the field (`param`: the top-level
    field; the message: its path, as `messages[0].role`) and what is wrong with it. Of several
    errors, the first that is not a type mismatch: a union reports a mismatch for each of its
    forms besides the real fault of the form that fit."""
    names = _field_names(models.completion) | _field_names(models.chat)
    errors = e.errors(include_url=False)
    chosen = next((x for x in errors if not x["type"].endswith(_TYPE_ERRORS)), errors[0])
    kind, loc, value = chosen["type"], chosen["loc"], chosen["input"]
    param = str(loc[0]) if loc else None
    if not loc:
        return RequestError(f"the request body must be a JSON object, got {_short(value)}", None)
    if kind == "extra_forbidden":
        if len(loc) == 1 and loc[0] in UNSUPPORTED:
            return RequestError(UNSUPPORTED[loc[0]], param)
        path = ".".join(filter(None, [_path(loc[:-1], names), str(loc[-1])]))
        return RequestError(f"{path} is not a field this server accepts (its fields: /openapi.json)", param)
    path = _path(loc, names)
    if kind == "missing":
        return RequestError(f"{path} is required", param)
    if kind == "too_long" and path == "prompt" and chosen["ctx"]["max_length"] == 1:
        return RequestError(f"prompt holds {len(value)} prompts: batched prompts are not supported, send one per "
                            "request", param)
    if kind in ("string_too_long", "too_long"):
        unit = "characters" if kind == "string_too_long" else "token ids" if path.startswith("prompt") else "items"
        return RequestError(f"{path} has {len(value)} {unit}, over the limit of {chosen['ctx']['max_length']}", param)
    if kind.endswith(_TYPE_ERRORS):
        what = WHAT.get(path.rsplit(".", 1)[-1].split("[")[0])
        if what is None:
            same = [x["msg"] for x in errors if _path(x["loc"], names) == path and x["type"].endswith(_TYPE_ERRORS)]
            what = ", or ".join(dict.fromkeys(m.removeprefix("Input should be ") for m in same))
        return RequestError(f"{path} should be {what}, got {_short(value)}", param)
    got = "" if isinstance(value, (dict, list)) else f", got {_short(value)}"
    return RequestError(f"{path}: {chosen['msg']}{got}", param)


def _field_names(model: type[BaseModel]) -> set[str]:
    """Every field name of `model` and of the models inside it."""
    names, todo = set(), [model]
    while todo:
        m = todo.pop()
        names |= set(m.model_fields)
        for field in m.model_fields.values():
            todo += [t for t in _models_in(field.annotation) if t not in todo]
    return names


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _path(loc: tuple, names: set[str]) -> str:
    """A pydantic error location as a field path (`messages[0].content`), without the union
    members' tags pydantic puts in it (`str`, `list[int]`, ...)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in names:
            path += f".{part}" if path else part
    return path


def _short(value) -> str:
    """A value for an error message, never long: big strings, lists and objects by their size."""
    if isinstance(value, (str, list, dict)) and len(value) > 40:
        unit = "characters" if isinstance(value, str) else "items"
        return f"a {type(value).__name__} of {len(value)} {unit}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
