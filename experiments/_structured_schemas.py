"""A corpus of JSON schemas of the kinds people send for structured output (shared by
tests/test_structured.py and experiments/bench_structured.py), generated from a few dozen templates: nested objects, arrays with min/max items, enums, string patterns and formats,
numbers with bounds, optional fields, $ref and anyOf. `corpus()` gives (label, schema) pairs,
each label the template's name and its variant."""

from __future__ import annotations

import itertools

_WORDS = ["id", "name", "city", "tag", "code", "kind", "note", "size", "rank", "flag"]


def _obj(props: dict, required=None, additional=False) -> dict:
    out = {"type": "object", "properties": props, "additionalProperties": additional}
    out["required"] = list(props) if required is None else required
    return out


def _short_string(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _templates(v: int) -> dict[str, dict]:
    """The templates of variant v (0..3): v changes names, bounds, sizes and enum members."""
    a, b, c = _WORDS[v % 10], _WORDS[(v + 3) % 10], _WORDS[(v + 6) % 10]
    lo, hi = -5 * v, 10 + 20 * v
    return {
        "flat_object": _obj({a: {"type": "integer"}, b: _short_string(4 + v)}),
        "integer_bounds": _obj({a: {"type": "integer", "minimum": lo, "maximum": hi}}),
        "number_bounds": _obj({a: {"type": "number", "minimum": lo, "maximum": hi}}),
        "exclusive_bounds": _obj({a: {"type": "integer", "exclusiveMinimum": lo, "exclusiveMaximum": hi + 2}}),
        "boolean_and_null": _obj({a: {"type": "boolean"}, b: {"type": "null"}}),
        "string_enum": _obj({a: {"enum": ["red", "green", "blue", "cyan"][: 2 + v % 3]}}),
        "mixed_enum": _obj({a: {"enum": [1, "two", None, True][: 2 + v % 3]}}),
        "const": _obj({a: {"const": f"v{v}"}, b: {"type": "integer", "minimum": 0, "maximum": 9}}),
        "pattern_code": _obj({a: {"type": "string", "pattern": f"^[A-Z]{{{2 + v % 2}}}-[0-9]{{{1 + v % 3}}}$"}}),
        "pattern_word": _obj({a: {"type": "string", "pattern": "^[a-z]{1,%d}$" % (3 + v)}}),
        "format_date": _obj({a: {"type": "string", "format": "date"}}),
        "format_time": _obj({a: {"type": "string", "format": "time"}}),
        "format_uuid": _obj({a: {"type": "string", "format": "uuid"}}),
        "format_ipv4": _obj({a: {"type": "string", "format": "ipv4"}}),
        "format_email": _obj({a: {"type": "string", "format": "email"}}),
        "string_length": _obj({a: {"type": "string", "minLength": 1 + v % 2, "maxLength": 3 + v}}),
        "array_bounds": _obj({a: {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                  "minItems": v % 2, "maxItems": 2 + v}}),
        "array_of_enums": _obj({a: {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1,
                                    "maxItems": 1 + v}}),
        "array_of_objects": _obj({a: {"type": "array", "maxItems": 1 + v % 3,
                                      "items": _obj({b: {"type": "integer"}, c: _short_string(3)})}}),
        "top_level_array": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2 + v},
        "nested_two": _obj({a: _obj({b: {"type": "integer", "minimum": 0, "maximum": 50}})}),
        "nested_three": _obj({a: _obj({b: _obj({c: {"enum": ["lo", "hi"]}})})}),
        "optional_fields": _obj({a: {"type": "integer"}, b: _short_string(3), c: {"type": "boolean"}}, required=[a]),
        "all_optional": _obj({a: {"type": "boolean"}, b: {"type": "integer", "maximum": 5}}, required=[]),
        "ref_definition": {"$defs": {"point": _obj({"x": {"type": "integer", "minimum": lo, "maximum": hi},
                                                     "y": {"type": "integer", "minimum": lo, "maximum": hi}})},
                           **_obj({a: {"$ref": "#/$defs/point"}, b: {"$ref": "#/$defs/point"}}, required=[a])},
        "ref_array": {"$defs": {"item": _obj({"k": {"enum": ["p", "q"]}})},
                      **_obj({a: {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2 + v % 2}})},
        "anyof_scalar": _obj({a: {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}),
        "anyof_objects": _obj({a: {"anyOf": [_obj({"kind": {"const": "cat"}, "lives": {"type": "integer",
                                                                                        "maximum": 9}}),
                                             _obj({"kind": {"const": "dog"}, "good": {"type": "boolean"}})]}}),
        "anyof_string_or_array": _obj({a: {"anyOf": [_short_string(3), {"type": "array", "items": {"type": "integer"},
                                                                          "maxItems": 2}]}}),
        "nullable_type_list": _obj({a: {"type": ["integer", "null"], "maximum": 100}}),
        "additional_allowed": _obj({a: {"type": "integer"}}, additional={"type": "integer", "maximum": 3}),
        "person": _obj({"name": _short_string(6), "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "email": {"type": "string", "format": "email"}}, required=["name", "age"]),
        "order": _obj({"order_id": {"type": "string", "pattern": "^ORD[0-9]{3}$"},
                       "items": {"type": "array", "minItems": 1, "maxItems": 1 + v % 2,
                                 "items": _obj({"sku": _short_string(4), "qty": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 9}})},
                       "status": {"enum": ["new", "paid", "shipped"]}}),
    }


def corpus(variants: int = 4) -> list[tuple[str, dict]]:
    """(label, schema) for every template and variant: variants * 33 schemas."""
    return [(f"{name}/{v}", schema) for v in range(variants) for name, schema in _templates(v).items()]


def sample(n: int) -> list[tuple[str, dict]]:
    """n schemas spread over the templates (one variant each)."""
    every = corpus()
    return list(itertools.islice(every[::max(1, len(every) // n)], n))
