"""Headless Chromium for the web console's tests, driven by Playwright for Python with
the system's Chromium (Debian's /usr/bin/chromium; no `playwright install` download)."""
from __future__ import annotations

import shutil

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def launch(playwright):
    """A headless Chromium; skips the test where Playwright or Chromium is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    return playwright.chromium.launch(executable_path=path, headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])
