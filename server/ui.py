"""The built-in chat page: `GET /` and its static files under `/ui/` (from `server/ui/`).

Off with `server.ui = false`. Everything the page needs ships inside the package (vendored npm
builds with their licences in `server/ui/vendor/`); nothing is fetched from a CDN. Responses
carry a Content-Security-Policy that allows only same-origin scripts, styles and requests, so
even a sanitizer miss could not run an inline handler or load a remote resource.

The page learns whether it must ask for an API key from `/ui/config.json` (outside `/v1`, so
no key is needed to read it); it never has to provoke a 401 to find out.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

from server.protocol import dumps

UI_DIR = Path(__file__).with_name("ui")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".svg": "image/svg+xml", ".txt": "text/plain", ".json": "application/json"}


def _security_headers(cache: str) -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": cache}


class ChatPage:
    """Serves the page and a fixed set of files, read once at start-up (no path traversal:
    a request can only name a file that was listed when the app was built)."""

    __slots__ = ("files", "config_body")

    def __init__(self, api_key_required: bool, ui_dir: Path = UI_DIR):
        self.files: dict[str, tuple[bytes, str]] = {}
        for path in sorted(ui_dir.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                rel = path.relative_to(ui_dir).as_posix()
                ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
                self.files[rel] = (path.read_bytes(), ctype or "application/octet-stream")
        if "index.html" not in self.files:
            raise FileNotFoundError(f"the chat page is missing: {ui_dir / 'index.html'} "
                                    f"(set server.ui = false to run without it)")
        self.config_body = dumps({"api_key_required": api_key_required})

    async def index(self, request: web.Request) -> web.Response:
        body, ctype = self.files["index.html"]
        return web.Response(body=body, content_type=ctype, charset="utf-8",
                            headers=_security_headers("no-cache"))

    async def config(self, request: web.Request) -> web.Response:
        return web.Response(body=self.config_body, content_type="application/json",
                            headers=_security_headers("no-store"))

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files or name == "index.html":
            raise web.HTTPNotFound()
        body, ctype = self.files[name]
        charset = "utf-8" if ctype.startswith(("text/", "image/svg")) else None
        return web.Response(body=body, content_type=ctype, charset=charset,
                            headers=_security_headers("no-cache"))


def add_ui_routes(app: web.Application, api_key_required: bool) -> ChatPage:
    page = ChatPage(api_key_required)
    app.add_routes([
        web.get("/", page.index),
        web.get("/ui/config.json", page.config),
        web.get("/ui/{name:.+}", page.static),
    ])
    return page
