"""The web UI's files: ``/`` is ``conveyor/web/index.html``; ``/ui/<file>`` the rest.

Owns: reading the UI's static files shipped in the package (package data, read
once through importlib.resources, no build step), their content types, and the
headers every UI response carries: a Content-Security-Policy that allows only
the broker's own scripts and styles (no inline script, so markup that slipped
into a page could not run), ``nosniff`` and no framing.
Must not know: the API, the broker.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from conveyor.protocols.http.codec import ApiResponse

UI_PREFIX: Final = "/ui/"
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".ico": "image/x-icon",
}
SECURITY_HEADERS: Final = (
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; "
     "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
     "form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)
FILES_MAX: Final = 64  # the UI is a handful of files; more is a packaging mistake


class WebFiles:
    def __init__(self) -> None:
        # file name -> (content type, bytes)
        self._files: dict[str, tuple[str, bytes]] = {}
        root = resources.files("conveyor") / "web"
        if root.is_dir():
            for entry in list(root.iterdir())[:FILES_MAX]:
                suffix = entry.name[entry.name.rfind("."):] if "." in entry.name else ""
                if entry.is_file() and suffix in CONTENT_TYPES:
                    self._files[entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())

    def names(self) -> list[str]:
        return sorted(self._files)

    def serves(self, path: str) -> bool:
        return path in ("/", "/index.html") or path.startswith(UI_PREFIX)

    def response(self, method: str, path: str) -> ApiResponse:
        if method not in ("GET", "HEAD"):
            return ApiResponse(405, {"error": {"code": "method_not_allowed",
                                               "message": "the UI is read with GET",
                                               "details": {}}}, (("Allow", "GET, HEAD"),))
        name = "index.html" if path in ("/", "/index.html") else path[len(UI_PREFIX):]
        found = self._files.get(name)
        if found is None:
            return ApiResponse(404, {"error": {"code": "not_found", "message": "no such file",
                                               "details": {"path": path[:200]}}})
        content_type, data = found
        return ApiResponse(200, raw=b"" if method == "HEAD" else data,
                           content_type=content_type, headers=SECURITY_HEADERS)
