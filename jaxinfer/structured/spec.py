"""StructuredOutput: the constraint a request's output must follow, checked for shape when it is made.

Exactly one of
  json_schema  a JSON schema (a dict, or its JSON text): the output is one JSON value that validates
  json_object  True: the output is one JSON object (OpenAI's response_format {"type": "json_object"})
  regex        the output matches this regular expression (Rust `regex` syntax, as llguidance reads it)
  choice       the output is exactly one of these strings
  grammar      the output is a sentence of this Lark grammar (llguidance's dialect, with `start:`)
Whether the constraint compiles is known only against a tokenizer: an engine checks it when a
request arrives (jaxinfer/structured/grammars.py) and raises ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# The characters Rust's regex::escape escapes: a choice is matched literally.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def escape_regex(text: str) -> str:
    """text as a regex (Rust syntax) that matches it literally."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


@dataclasses.dataclass(frozen=True, eq=False)
class StructuredOutput:
    json_schema: Mapping[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [f for f in FIELDS if getattr(self, f) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured must set exactly one of {', '.join(FIELDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured.json_object must be True or False, got {self.json_object!r}")
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured.json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (Mapping, bool)):
                raise ValueError(f"structured.json_schema must be a JSON object (a schema), got {_short(schema)}")
            object.__setattr__(self, "json_schema", schema)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured.{name} must be a non-empty string, got {_short(value)}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not hasattr(self.choice, "__iter__"):
                raise ValueError(f"structured.choice must be a list of strings, got {_short(self.choice)}")
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"structured.choice must be a non-empty list of non-empty strings, got "
                                 f"{_short(list(choice))}")
            object.__setattr__(self, "choice", choice)

    @property
    def field(self) -> str:
        """The name of the field that is set."""
        return next(f for f in FIELDS if getattr(self, f) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(field, canonical text): what compiled grammars are cached by."""
        value = getattr(self, self.field)
        if self.field == "json_schema":
            return self.field, json.dumps(value, sort_keys=True, separators=(",", ":"))
        if self.field == "choice":
            return self.field, json.dumps(list(value))
        return self.field, "" if value is True else value

    def __eq__(self, other):
        return isinstance(other, StructuredOutput) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
