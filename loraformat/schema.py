"""JSON-Schema validation of the metadata document (schemas/adapter-v1.schema.json).

Header-only commands must start in well under 0.3 s, and importing ``jsonschema`` (referencing, attrs, the
bundled metaschemas) alone costs ~0.1 s. So the v1 schema is evaluated by the small evaluator below, which
implements exactly the 2020-12 keywords the schema uses; a schema using any other keyword falls back to
``jsonschema``. tests/test_spec.py checks that both agree on valid and mutated documents.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

from loraformat.errors import SchemaError
from loraformat.rules import and_more

SCHEMA_FILE = "adapter-v1.schema.json"

_ANNOTATIONS = {"$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples"}
_KEYWORDS = {
    "$ref",
    "type",
    "enum",
    "const",
    "pattern",
    "required",
    "properties",
    "additionalProperties",
    "propertyNames",
    "minProperties",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "oneOf",
    "anyOf",
    "if",
    "then",
    "else",
}


@functools.cache
def load_schema() -> dict[str, Any]:
    return json.loads(
        resources.files("loraformat").joinpath("schemas").joinpath(SCHEMA_FILE).read_text("utf-8")
    )


def _uses_only_known_keywords(node: Any) -> bool:
    if isinstance(node, list):
        return all(_uses_only_known_keywords(x) for x in node)
    if not isinstance(node, dict):
        return True
    for key, value in node.items():
        if key not in _KEYWORDS | _ANNOTATIONS:
            return False
        if key in ("properties", "$defs"):
            if not all(_uses_only_known_keywords(v) for v in value.values()):
                return False
        elif key not in ("enum", "const", "required", "pattern", "type") and not _uses_only_known_keywords(
            value
        ):
            return False
    return True


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    ),
}


def _eq(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0 but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


class _Evaluator:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.root = schema
        # (schema node, type, value) -> valid, for scalars: a document repeats the same ranks, alphas, kinds and
        # layer-name patterns thousands of times; one evaluator per document, so the cache is bounded by it
        self._scalars: dict[tuple[int, type, Any], bool] = {}

    def _resolve(self, ref: str) -> Any:
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def valid(self, node: Any, value: Any) -> bool:
        """Whether ``value`` satisfies ``node``: the checks of :meth:`errors` without messages or generators,
        several times faster on the common case, a valid document (a 50,000-module one has 950,000 nodes)."""
        if value is None or isinstance(value, (str, int, float)):
            key = (id(node), type(value), value)
            known = self._scalars.get(key)
            if known is None:
                known = self._scalars[key] = self._valid(node, value)
            return known
        return self._valid(node, value)

    def _valid(self, node: Any, value: Any) -> bool:
        if node is True or node == {}:
            return True
        if node is False:
            return False
        if "$ref" in node and not self.valid(self._resolve(node["$ref"]), value):
            return False
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            if not any(_TYPES[t](value) for t in types):
                return False
        if "enum" in node and not any(_eq(value, e) for e in node["enum"]):
            return False
        if "const" in node and not _eq(value, node["const"]):
            return False
        if isinstance(value, str) and not self._valid_string(node, value):
            return False
        if _TYPES["number"](value) and not self._valid_number(node, value):
            return False
        if isinstance(value, list) and not self._valid_array(node, value):
            return False
        if isinstance(value, dict) and not self._valid_object(node, value):
            return False
        for key in ("oneOf", "anyOf"):
            if key in node:
                passing = sum(self.valid(sub, value) for sub in node[key])
                if passing == 0 or (key == "oneOf" and passing > 1):
                    return False
        if "if" in node:
            branch = "then" if self.valid(node["if"], value) else "else"
            if branch in node and not self.valid(node[branch], value):
                return False
        return True

    @staticmethod
    def _valid_string(node: Any, value: str) -> bool:
        if "pattern" in node and not re.search(node["pattern"], value):
            return False
        return not ("minLength" in node and len(value) < node["minLength"])

    @staticmethod
    def _valid_number(node: Any, value: Any) -> bool:
        if "minimum" in node and value < node["minimum"]:
            return False
        if "maximum" in node and value > node["maximum"]:
            return False
        return not ("exclusiveMinimum" in node and value <= node["exclusiveMinimum"])

    def _valid_array(self, node: Any, value: list[Any]) -> bool:
        if "minItems" in node and len(value) < node["minItems"]:
            return False
        if "maxItems" in node and len(value) > node["maxItems"]:
            return False
        return "items" not in node or all(self.valid(node["items"], item) for item in value)

    def _valid_object(self, node: Any, value: dict[str, Any]) -> bool:
        if any(req not in value for req in node.get("required", ())):
            return False
        if "minProperties" in node and len(value) < node["minProperties"]:
            return False
        if "propertyNames" in node and not all(self.valid(node["propertyNames"], n) for n in value):
            return False
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for name, sub in value.items():
            if not self.valid(props[name] if name in props else extra, sub):
                return False
        return True

    def errors(
        self, node: Any, value: Any, path: tuple[Any, ...] = ()
    ) -> Iterator[tuple[tuple[Any, ...], str]]:
        if node is True or node == {}:
            return
        if node is False:
            yield path, "False schema does not allow " + repr(value)
            return
        if "$ref" in node:
            yield from self.errors(self._resolve(node["$ref"]), value, path)
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            if not any(_TYPES[t](value) for t in types):
                yield path, f"{value!r} is not of type {', '.join(repr(t) for t in types)}"
                return
        if "enum" in node and not any(_eq(value, e) for e in node["enum"]):
            yield path, f"{value!r} is not one of {node['enum']!r}"
        if "const" in node and not _eq(value, node["const"]):
            yield path, f"{node['const']!r} was expected"
        if isinstance(value, str):
            if "pattern" in node and not re.search(node["pattern"], value):
                yield path, f"{value!r} does not match {node['pattern']!r}"
            if "minLength" in node and len(value) < node["minLength"]:
                yield path, f"{value!r} is too short"
        if _TYPES["number"](value):
            if "minimum" in node and value < node["minimum"]:
                yield path, f"{value!r} is less than the minimum of {node['minimum']!r}"
            if "maximum" in node and value > node["maximum"]:
                yield path, f"{value!r} is greater than the maximum of {node['maximum']!r}"
            if "exclusiveMinimum" in node and value <= node["exclusiveMinimum"]:
                yield path, f"{value!r} is less than or equal to the minimum of {node['exclusiveMinimum']!r}"
        if isinstance(value, list):
            if "minItems" in node and len(value) < node["minItems"]:
                yield (
                    path,
                    f"{value!r} should be non-empty" if node["minItems"] == 1 else f"{value!r} is too short",
                )
            if "maxItems" in node and len(value) > node["maxItems"]:
                yield path, f"{value!r} is too long"
            if "items" in node:
                for i, item in enumerate(value):
                    yield from self.errors(node["items"], item, (*path, i))
        if isinstance(value, dict):
            yield from self._object(node, value, path)
        for key in ("oneOf", "anyOf"):
            if key in node:
                results = [list(self.errors(sub, value, path)) for sub in node[key]]
                passing = sum(not r for r in results)
                # a branch that failed on more than its type is the one meant: report its reasons
                meant = [r for r in results if r and not (len(r) == 1 and " is not of type " in r[0][1])]
                if passing == 0 and len(meant) == 1:
                    yield from meant[0]
                elif passing == 0:
                    yield path, f"{value!r} is not valid under any of the given schemas"
                elif key == "oneOf" and passing > 1:
                    yield path, f"{value!r} is valid under each of several given schemas"
        if "if" in node:
            branch = "then" if not any(True for _ in self.errors(node["if"], value, path)) else "else"
            if branch in node:
                yield from self.errors(node[branch], value, path)

    def _object(
        self, node: Any, value: dict[str, Any], path: tuple[Any, ...]
    ) -> Iterator[tuple[tuple[Any, ...], str]]:
        for req in node.get("required", ()):
            if req not in value:
                yield path, f"{req!r} is a required property"
        if "minProperties" in node and len(value) < node["minProperties"]:
            yield (
                path,
                f"{value!r} should be non-empty"
                if node["minProperties"] == 1
                else f"{value!r} has too few properties",
            )
        if "propertyNames" in node:
            for name in value:
                for _, message in self.errors(node["propertyNames"], name, path):
                    yield path, message
        props = node.get("properties", {})
        for name, sub in value.items():
            if name in props:
                yield from self.errors(props[name], sub, (*path, name))
            elif "additionalProperties" in node:
                yield from self.errors(node["additionalProperties"], sub, (*path, name))


@functools.cache
def _validator() -> Any:
    """The built-in evaluator, or jsonschema's validator if the schema goes beyond the built-in keywords."""
    schema = load_schema()
    if _uses_only_known_keywords(schema):
        return _Evaluator(schema)
    return jsonschema_validator()


@functools.cache
def jsonschema_validator() -> Any:
    """The reference implementation (used by the tests, and as the fallback)."""
    import jsonschema

    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def violations(document: Any) -> list[tuple[str, str]]:
    """(JSON path, message) for every schema violation, in document order; empty when valid."""
    v = _validator()
    if isinstance(v, _Evaluator):
        if _Evaluator(v.root).valid(v.root, document):  # its own scalar cache, dropped with the document
            return []
        found = [(list(p), m) for p, m in v.errors(v.root, document)]
    else:
        found = [(list(e.absolute_path), e.message) for e in v.iter_errors(document)]
    found.sort(key=lambda pm: (len(pm[0]), [str(p) for p in pm[0]]))
    return [("/".join(str(p) for p in where) or "(root)", message) for where, message in found]


def schema_errors(document: Any) -> list[str]:
    """Every schema violation as 'at <json path>: <message>', best first; empty when valid."""
    return [f"at {where}: {message}" for where, message in violations(document)]


def validate_document(document: Any, *, path: str | None = None) -> None:
    errors = schema_errors(document)
    if errors:
        raise SchemaError(
            f"metadata does not match the v1 schema {errors[0]}{and_more(len(errors))}", path=path
        )
