"""The browsable page of the OpenAPI document, at ``/schema/docs``.

Litestar's own renderers (Swagger, Redoc, Scalar...) load their scripts from a
CDN, which a ledger with no internet cannot reach; this one is a plain HTML
page built on the server from the same document: every route with its
parameters and the shape of its answer, using the web view's stylesheet.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.openapi.plugins import OpenAPIRenderPlugin

from projections.web.render import esc


def _schema_text(schema: dict[str, Any] | None) -> str:
    """A schema in one line: a component's name, an array of it, or its type."""
    if not schema:
        return ""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "oneOf" in schema:
        return " | ".join(filter(None, (_schema_text(s) for s in schema["oneOf"])))
    if schema.get("type") == "array":
        return f"list[{_schema_text(schema.get('items'))}]"
    kind = schema.get("type", "object")
    if "enum" in schema:
        return f"{kind}: {', '.join(map(str, schema['enum']))}"
    return str(kind) + (f" ({schema['format']})" if "format" in schema else "")


def _answers(responses: dict[str, Any]) -> str:
    out = []
    for status, answer in responses.items():
        shapes = [f"{media}: {_schema_text(body.get('schema'))}" for media, body in answer.get("content", {}).items()]
        out.append(f"<li><b>{esc(status)}</b> {esc(answer.get('description', ''))} "
                   f"<code>{esc('; '.join(shapes))}</code></li>")
    return f"<ul>{''.join(out)}</ul>"


def _component(name: str, schema: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{esc(field)}</code></td><td><code>{esc(_schema_text(spec))}</code></td>"
        f"<td>{'required' if field in schema.get('required', []) else ''}</td></tr>"
        for field, spec in schema.get("properties", {}).items())
    return (f'<section id="{esc(name)}"><h2>{esc(name)}</h2>'
            f'<table><thead><tr><th>field</th><th>type</th><th></th></tr></thead><tbody>{rows}</tbody></table>'
            "</section>")


class RouteListPlugin(OpenAPIRenderPlugin):
    """Renders the OpenAPI document as a self-contained HTML page."""

    def __init__(self, path: str = "/docs") -> None:
        super().__init__(path=path, favicon="<link rel='icon' href='data:,'>", style="")

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        sections = []
        for path, item in openapi_schema.get("paths", {}).items():
            for method, op in item.items():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                params = "".join(
                    f"<tr><td><code>{esc(p['name'])}</code></td><td>{esc(p['in'])}</td>"
                    f"<td><code>{esc(_schema_text(p.get('schema')))}</code></td>"
                    f"<td>{esc(p.get('description', ''))}</td></tr>" for p in op.get("parameters", []))
                table = ('<table><thead><tr><th>parameter</th><th>in</th><th>type</th><th></th></tr></thead>'
                         f"<tbody>{params}</tbody></table>") if params else ""
                sections.append(
                    f'<section><h2><code>{esc(method.upper())} {esc(path)}</code> {esc(op.get("summary", ""))}</h2>'
                    f'<p>{esc(op.get("description", ""))}</p>{table}{_answers(op["responses"])}</section>')
        components = "".join(_component(name, schema) for name, schema in
                             sorted(openapi_schema.get("components", {}).get("schemas", {}).items()))
        info = openapi_schema.get("info", {})
        page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{self.favicon}'
                f'<title>{esc(info.get("title", "API"))} API</title>'
                '<link rel="stylesheet" href="/web/static/web.css"></head><body><main>'
                f'<h1>{esc(info.get("title", "API"))} API</h1><p>{esc(info.get("description", ""))} '
                'The document itself: <a href="/schema">/schema</a> (JSON), '
                '<a href="/schema/openapi.yaml">/schema/openapi.yaml</a>.</p>'
                f"{''.join(sections)}<h1>Shapes</h1>{components}</main></body></html>")
        return page.encode()
