"""``GET /``: what this server is, for a person (HTML) or a program (JSON).

A browser (``Accept: text/html``) gets a small page: model, backend, status and links to
/docs, /health and /metrics. Anything else gets the same facts as JSON. ``POST /`` is
TEI's feature-extraction route (tei.py).
"""

from __future__ import annotations

from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from reranker import __version__
from reranker.api.observe import runtime_of
from reranker.api.responses import ORJSONResponse

LINKS = {
    "docs": "/docs",
    "openapi": "/openapi.json",
    "health": "/health",
    "metrics": "/metrics",
    "models": "/v1/models",
}


def summary(request: Request) -> dict[str, Any]:
    health = runtime_of(request).health()
    model = health["model"]
    return {
        "service": "reranker",
        "version": __version__,
        "status": health["status"],
        "model": {key: model[key] for key in ("name", "kind", "backend", "device", "capabilities")},
        "models": [
            {key: each[key] for key in ("name", "kind", "backend", "device", "capabilities")}
            for each in (health.get("models") or {"": model}).values()
        ],
        "links": LINKS,
    }


async def root(request: Request) -> Response:
    facts = summary(request)
    if "text/html" not in request.headers.get("accept", ""):
        return ORJSONResponse(facts)
    model = facts["model"]
    rows = [
        (
            f"model {each['name']}",
            f"{each['kind'] or '-'} on {each['backend'] or '-'} / {each['device'] or '-'}",
        )
        for each in facts["models"]
    ]
    rows += [("status", facts["status"]), ("version", facts["version"])]
    table = "\n".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    links = "\n".join(f'<li><a href="{url}">{escape(url)}</a></li>' for url in LINKS.values())
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>reranker: {escape(str(model["name"]))}</title>
<style>body {{ font-family: sans-serif; margin: 2em; }} th {{ text-align: left; padding-right: 1em; }}</style>
</head>
<body>
<h1>reranker</h1>
<table>
{table}
</table>
<p>Interactive API docs: <a href="/docs">/docs</a>.</p>
<ul>
{links}
</ul>
</body>
</html>
"""
    return HTMLResponse(page)
