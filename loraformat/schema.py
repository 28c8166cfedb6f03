"""JSON-Schema validation of the metadata document (schemas/adapter-v1.schema.json)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from loraformat.errors import SchemaError

SCHEMA_FILE = "adapter-v1.schema.json"


@functools.cache
def load_schema() -> dict[str, Any]:
    return json.loads(resources.files("loraformat").joinpath("schemas", SCHEMA_FILE).read_text("utf-8"))


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(document: Any) -> list[str]:
    """Every schema violation as 'at <json path>: <message>', best first; empty when valid."""
    errors = sorted(_validator().iter_errors(document), key=lambda e: (len(e.path), list(map(str, e.path))))
    out = []
    for err in errors:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"at {where}: {err.message}")
    return out


def validate_document(document: Any, *, path: str | None = None) -> None:
    errors = schema_errors(document)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SchemaError(f"metadata does not match the v1 schema {errors[0]}{more}", path=path)
