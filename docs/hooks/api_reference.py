"""MkDocs hook: the API reference page rendered from the service's OpenAPI document at build time.

The document comes from the application itself (``serve.service.ingress.app``,
its routes bound as Ray Serve binds them), so the page cannot drift from the
service; ``<!-- openapi -->`` in ``api-reference.md`` is replaced by it.
"""

from __future__ import annotations

import json
from typing import Any

MARKER = "<!-- openapi -->"


def openapi_document() -> dict[str, Any]:
    """``/openapi.json`` as the running service serves it, without starting one."""
    from serve.service.app import ingress_class
    from serve.service.ingress import app

    ingress_class()  # Ray Serve's binding of the routes to the deployment class (drops their `self`)
    app.openapi_schema = None
    return app.openapi()


def type_of(schema: dict[str, Any]) -> str:
    """A short type for a JSON schema: `string`, `ScoreResponse`, `array of Chunk`, `A or null`."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(type_of(s) for s in schema["anyOf"])
    kind = schema.get("type", "object")
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map to {type_of(schema['additionalProperties'])}"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    return kind + (f" ({schema['format']})" if "format" in schema else "")


def cell(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def fields(schema: dict[str, Any]) -> list[str]:
    """A Markdown table of an object schema's properties."""
    props = schema.get("properties", {})
    if not props:
        return [f"{type_of(schema)}", ""]
    required = set(schema.get("required", []))
    rows = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for name, prop in props.items():
        rows.append(
            f"| `{name}` | {type_of(prop)} | {'yes' if name in required else ''} | {cell(prop.get('description'))} |"
        )
    return [*rows, ""]


def render(doc: dict[str, Any]) -> str:
    out = [f"OpenAPI {doc['openapi']}, {doc['info']['title']} {doc['info']['version']}.", ""]
    out += ["## Operations", ""]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            out += [f"### `{method.upper()} {path}`", "", f"Operation id `{op['operationId']}`.", ""]
            if op.get("description"):
                out += [cell(op["description"]), ""]
            for param in op.get("parameters", []):
                out += [f"Parameter `{param['name']}` ({param['in']}): {type_of(param.get('schema', {}))}.", ""]
            for ctype, body in op.get("requestBody", {}).get("content", {}).items():
                out += [f"Request body, `{ctype}`:", "", *fields(body.get("schema", {}))]
            out += ["| status | meaning | body |", "| --- | --- | --- |"]
            for status, resp in op.get("responses", {}).items():
                schema = resp.get("content", {}).get("application/json", {}).get("schema")
                out.append(f"| {status} | {cell(resp.get('description'))} | {type_of(schema) if schema else ''} |")
            out.append("")
    out += ["## Schemas", ""]
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [cell(schema["description"]), ""]
        out += fields(schema)
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(openapi_document()))
