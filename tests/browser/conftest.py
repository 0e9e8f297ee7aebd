"""Browser tests' setup: Debian's Chromium driven by Playwright, one browser per module.

The suite installs what it needs itself: when ``/usr/bin/chromium`` is missing it runs
``apt-get install -y chromium`` (the test machines run as root). If the browser still
cannot be had the tests FAIL with the reason; they never skip. Playwright's own
browser downloads (``playwright install``) are never used: ``executable_path`` points
at the system Chromium.

Screenshots go to ``CONVEYOR_UI_SHOTS`` (default /tmp/conveyor-ui-shots/); the path is
printed so a run's log says where to find them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import SHOTS, TAKEN, PageWatch

CHROMIUM = Path(os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_TIMEOUT_S = 900


def ensure_chromium() -> Path:
    """The system Chromium, installed with apt-get when missing; pytest.fail otherwise."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing and apt-get is not available to install it")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, env=environment,
                                timeout=INSTALL_TIMEOUT_S, check=False)
        if result.returncode != 0:
            pytest.fail(f"cannot install chromium: {' '.join(command)} exited "
                        f"{result.returncode}: {result.stderr[-2000:]}")
    if not CHROMIUM.exists():
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = ensure_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:  # the dev extra brings it; a missing one is a failure
        pytest.fail(f"playwright is not installed (pip install -e '.[dev]'): {error}")
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {SHOTS}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(executable),
                                              args=LAUNCH_FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def laptop(browser: Any) -> Iterator[PageWatch]:
    # bypass_csp: the page's Content-Security-Policy would also stop Playwright's own
    # evaluated predicates; without it, the escaping tests prove escaping alone.
    context = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    watch = PageWatch(context.new_page())
    try:
        yield watch
    finally:
        context.close()
    assert watch.errors == [], watch.errors


@pytest.fixture()
def phone(browser: Any) -> Iterator[PageWatch]:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True, device_scale_factor=2, bypass_csp=True)
    watch = PageWatch(context.new_page())
    try:
        yield watch
    finally:
        context.close()
    assert watch.errors == [], watch.errors


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the screenshots are, even when output is captured."""
    if TAKEN:
        terminalreporter.write_line(f"UI screenshots ({len(TAKEN)}) in {SHOTS}:")
        for path in TAKEN:
            terminalreporter.write_line(f"  {path.name}")
