"""Helpers of the browser tests: a watched page (console errors) and screenshots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SHOTS = Path(os.environ.get("CONVEYOR_UI_SHOTS", "/tmp/conveyor-ui-shots"))
TAKEN: list[Path] = []  # screenshots of this run, listed at the end of the run


class PageWatch:
    """A page plus the console errors and uncaught exceptions it produced."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda message: self.errors.append(f"console: {message.text}")
                if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def shot(self, name: str) -> Path:
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        TAKEN.append(path)
        print(f"screenshot: {path}")
        return path
