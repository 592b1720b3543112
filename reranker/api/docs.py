"""``GET /docs``: interactive API documentation (Swagger UI) that works offline.

Swagger UI's files come from the pinned PyPI package ``swagger-ui-py`` (its ``static``
folder; the package is located, never imported: its Python side is for other frameworks),
so the page loads nothing from a CDN. The page reads ``/openapi.json``; "Try it out" sends
real requests to this server (with the key given under "Authorize" when keys are set).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from reranker.errors import NotFoundError

PACKAGE = "swagger_ui"  # the import name of swagger-ui-py (requirements.txt)
STATIC_PREFIX = "/docs/static/"
# The files the page uses: nothing else of the package is served.
STATIC_FILES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>reranker API</title>
  <link rel="stylesheet" href="{static}swagger-ui.css">
  <link rel="icon" type="image/png" href="{static}favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{static}swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      layout: "BaseLayout",
      tryItOutEnabled: true,
      displayRequestDuration: true,
      validatorUrl: null,
    }});
  </script>
</body>
</html>
"""


@cache
def static_dir() -> Path | None:
    """Swagger UI's static folder inside the installed package, or None when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


async def docs_page(request: Request) -> Response:
    if static_dir() is None:
        return HTMLResponse(
            "<p>The API docs need the package swagger-ui-py: <code>pip install -r requirements.txt</code>. "
            'The API description itself is at <a href="/openapi.json">/openapi.json</a>.</p>',
            status_code=503,
        )
    return HTMLResponse(PAGE.format(static=STATIC_PREFIX))


async def docs_static(request: Request) -> Response:
    name = request.path_params["name"]
    folder = static_dir()
    if name not in STATIC_FILES or folder is None:
        raise NotFoundError(f"no such docs file: {name}")
    return FileResponse(
        folder / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "public, max-age=86400"}
    )
