"""``/docs`` (Swagger UI) and ``/redoc`` that work without internet: their scripts and styles come
from the fastapi-offline package's files, served here, instead of FastAPI's default CDN. (ReDoc
still asks a CDN for its small "by Redocly" logo; the documentation renders without it.)"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse

from .errors import ApiError

ASSETS_URL = "/static/docs"
# the pages name what they load relative to themselves: under a route prefix (Ray Serve's
# route_prefix, the app's root_path) /prefix/docs loads /prefix/openapi.json, not /openapi.json
RELATIVE_ASSETS = ASSETS_URL.lstrip("/")
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def docs_router(title: str, openapi_url: str = "openapi.json") -> APIRouter:
    router = APIRouter(include_in_schema=False)
    root = assets_dir()

    @router.get("/docs")
    async def swagger():
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API",
            swagger_js_url=f"{RELATIVE_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{RELATIVE_ASSETS}/swagger-ui.css",
            swagger_favicon_url="favicon.ico",
        )

    @router.get("/redoc")
    async def redoc():
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - API",
            redoc_js_url=f"{RELATIVE_ASSETS}/redoc.standalone.js",
            redoc_favicon_url="favicon.ico",
            with_google_fonts=False,
        )

    @router.get(ASSETS_URL + "/{name}")
    async def asset(name: str):
        if name not in ASSETS:
            raise ApiError(404, f"no such file: {name}", "not_found_error", "http_404")
        return FileResponse(
            root / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"}
        )

    return router
