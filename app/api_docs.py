"""The JSON API's reference page, rendered on the server from its OpenAPI document: one self-contained HTML page
(no script, no stylesheet or font from elsewhere), so ``/api/v1/docs`` works on machines without internet, where
FastAPI's Swagger UI loads its code from a CDN and shows a blank page. Swagger UI stays at ``/api/v1/swagger``
for those with internet who want to try requests in the browser.

Each route gets its method, path, summary, description, parameters, the request body's fields (types,
constraints, defaults, descriptions, resolved through ``$ref``), the answers by status code and a ``curl``
line built from the schema's example. No torch, no FastAPI import: a pure function of the document.
"""
from __future__ import annotations

import html
import json
from typing import Any

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 64em; padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { font-size: 1.15em; margin-top: 2em; border-top: 1px solid #ddd; padding-top: 1em; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.92em; }
pre { background: #f5f5f5; padding: 0.6em 0.8em; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em;
text-align: left; vertical-align: top; } th { background: #fafafa; }
.method { display: inline-block; min-width: 3.5em; font-weight: 600; color: #fff; background: #3b6ea5;
padding: 0 0.4em; border-radius: 3px; text-align: center; } .post { background: #3a8a4f; }
"""


def resolve(schema: dict, document: dict) -> dict:
    """``schema`` with a top-level ``$ref`` (``#/components/schemas/Name``) replaced by its target."""
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 16:
        path = schema["$ref"].lstrip("#/").split("/")
        target: Any = document
        for part in path:
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema, seen = target, seen + 1
    return schema if isinstance(schema, dict) else {}


def type_name(schema: dict, document: dict) -> str:
    """A short readable type: ``integer``, ``string | null``, ``array of number``, ``SearchRequest``."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(type_name(option, document) for option in schema[key])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {type_name(schema.get('items', {}), document)}"
    return str(kind)


def constraints(schema: dict) -> str:
    words = []
    for key, text in (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"),
                      ("exclusiveMaximum", "< {}"), ("minLength", "length >= {}"), ("maxLength", "length <= {}")):
        if key in schema:
            value = schema[key]
            words.append(text.format(int(value) if isinstance(value, float) and value.is_integer() else value))
    if "default" in schema:
        words.append(f"default {json.dumps(schema['default'])}")
    return ", ".join(words)


def fields_table(schema: dict, document: dict) -> str:
    """The properties of an object schema as a table (name, type, required, constraints, description)."""
    schema = resolve(schema, document)
    properties = schema.get("properties") or {}
    if not properties:
        return f"<p><code>{html.escape(type_name(schema, document))}</code></p>"
    required = set(schema.get("required") or [])
    rows = []
    for name, field in properties.items():
        rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(type_name(field, document))}</td>"
                    f"<td>{'yes' if name in required else ''}</td><td>{html.escape(constraints(field))}</td>"
                    f"<td>{html.escape(field.get('description', ''))}</td></tr>")
    intro = f"<p>{html.escape(schema['description'])}</p>" if schema.get("description") else ""
    return (intro + "<table><tr><th>field</th><th>type</th><th>required</th><th>limits</th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


def curl_line(method: str, path: str, operation: dict, document: dict, base: str) -> str:
    """A ``curl`` command for the route, with the request body's first example (or ``{}``)."""
    url = base + path.replace("{item_id}", "42")
    body = ((operation.get("requestBody") or {}).get("content") or {}).get("application/json")
    if body is None:
        return f"curl -s '{url}'"
    schema = resolve(body.get("schema", {}), document)
    example = (schema.get("examples") or [{}])[0]
    return f"curl -s -X {method.upper()} '{url}' -H 'Content-Type: application/json' -d '{json.dumps(example)}'"


def render(document: dict, base: str) -> str:
    """The reference page for an OpenAPI ``document`` whose paths are served under ``base`` (a URL)."""
    info = document.get("info", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.get('title', 'API'))}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(info.get('title', 'API'))} <small>v{html.escape(str(info.get('version', '')))}"
             "</small></h1>",
             f"<p>{html.escape(info.get('description', ''))}</p>",
             f"<p>Base URL <code>{html.escape(base)}</code>. The machine-readable description is "
             f"<a href='{html.escape(base)}/openapi.json'><code>openapi.json</code></a>; with internet, "
             f"<a href='{html.escape(base)}/swagger'>Swagger UI</a> lets you try requests. Errors answer "
             "<code>{\"error\": message}</code> with the status code.</p>"]
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            parts.append(f"<h2><span class='method {html.escape(method)}'>{html.escape(method.upper())}</span> "
                         f"<code>{html.escape(path)}</code></h2>")
            if operation.get("summary"):
                parts.append(f"<p><b>{html.escape(operation['summary'])}</b></p>")
            if operation.get("description"):
                parts.append(f"<p>{html.escape(operation['description'])}</p>")
            parameters = operation.get("parameters") or []
            if parameters:
                rows = "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{html.escape(p.get('in', ''))}</td>"
                    f"<td>{html.escape(type_name(p.get('schema', {}), document))}</td>"
                    f"<td>{'yes' if p.get('required') else ''}</td>"
                    f"<td>{html.escape(constraints(p.get('schema', {})))}</td>"
                    f"<td>{html.escape(p.get('description', ''))}</td></tr>" for p in parameters)
                parts.append("<h3>Parameters</h3><table><tr><th>name</th><th>in</th><th>type</th><th>required</th>"
                             f"<th>limits</th><th>meaning</th></tr>{rows}</table>")
            body = ((operation.get("requestBody") or {}).get("content") or {}).get("application/json")
            if body is not None:
                parts.append("<h3>Request body (JSON)</h3>" + fields_table(body.get("schema", {}), document))
            answers = []
            for status, answer in (operation.get("responses") or {}).items():
                content = (answer.get("content") or {})
                schema = (content.get("application/json") or {}).get("schema")
                kind = (f" <code>{html.escape(type_name(schema, document))}</code>" if schema
                        else f" ({html.escape(', '.join(content))})" if content else "")
                answers.append(f"<li><b>{html.escape(str(status))}</b>: {html.escape(answer.get('description', ''))}"
                               f"{kind}</li>")
            if answers:
                parts.append("<h3>Answers</h3><ul>" + "".join(answers) + "</ul>")
            parts.append(f"<pre>{html.escape(curl_line(method, path, operation, document, base))}</pre>")
    schemas = (document.get("components") or {}).get("schemas") or {}
    if schemas:
        parts.append("<h2>Schemas</h2>")
        for name, schema in schemas.items():
            parts.append(f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3>" + fields_table(schema, document))
    parts.append("</body></html>")
    return "\n".join(parts)
