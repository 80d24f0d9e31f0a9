"""Pages for a person: the web page at / and the Swagger UI at /docs (served from local assets)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from service.api.routes.deps import (
    STATIC_DIR,
)

router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="bayesnet-cxr API",
        swagger_js_url="/swagger-assets/swagger-ui-bundle.js",
        swagger_css_url="/swagger-assets/swagger-ui.css",
        swagger_favicon_url="/swagger-assets/favicon-32x32.png",
    )


@router.get("/", include_in_schema=False)
async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return HTMLResponse("<h1>bayesnet-cxr</h1><p>The web page is not installed; see <a href='/docs'>/docs</a>.</p>")
    return FileResponse(page, headers={"Cache-Control": "no-cache"})
