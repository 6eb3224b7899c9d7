#!/usr/bin/env python
"""A screenshot of the web console's search page after a search (docs/web-search.png).

Against a running system (`delf up`) whose index holds landmarks-dev: drops --photo on the
search page of --url in headless Chromium (Playwright with the system's Chromium, no
download), waits for the ranked matches and their outlines, and saves the page.

    .venv/bin/python scripts/web_screenshot.py --url http://127.0.0.1:8080 \\
        --photo ../shared/data/landmarks-dev/berlin_berliner_dom/02.jpg --out docs/web-search.png
"""
from __future__ import annotations

import argparse
import shutil
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--photo", required=True)
    parser.add_argument("--out", default="docs/web-search.png")
    parser.add_argument("--top-k", default="6")
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no Chromium installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(args.url.rstrip("/") + "/")
        if args.token:
            page.fill("#token", args.token)
        page.set_input_files("#photo", args.photo)
        page.fill("#top-k", args.top_k)
        page.click("#search-go")
        page.wait_for_selector("#results li", timeout=300_000)
        page.wait_for_selector("#results li:first-child[data-outlined='true']", timeout=60_000)
        page.wait_for_timeout(1000)  # the thumbnails' last bytes
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
