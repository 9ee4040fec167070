"""The page at ``/``: try the service in a browser (record or choose an answer, see its score).

One self-contained HTML file (inline CSS and JS, nothing fetched from
elsewhere) shipped as package data in ``serve/service/static/``. It calls the
public API (``GET /v1/parts``, ``POST /v1/score``) like any other client, so it
needs no route of its own beyond this one.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from serve.service.routes import PAGE

router = APIRouter()


@functools.cache
def page_html() -> str:
    """The page's HTML (read once per process)."""
    return resources.files("serve.service").joinpath("static/index.html").read_text(encoding="utf-8")


@router.api_route(PAGE.path, methods=[PAGE.method], name=PAGE.name, include_in_schema=False)
async def index() -> HTMLResponse:
    """The page to try the service in a browser."""
    return HTMLResponse(page_html())
