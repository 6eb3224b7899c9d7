"""The web console in a real browser (headless Chromium, Playwright) against the running
system: ingest landmarks-dev photos with the ingest page and watch the job complete,
drop the partner photo on the search page and see its partner first, verified and
outlined, with its correspondences; browse the collection; delete a photo."""
from __future__ import annotations

import shutil

import pytest

from photos import landmarks_dir
from polling import wait_for
from web_browser import launch
from web_probe import Http, needs_listing

pytestmark = [pytest.mark.slow]

ROOT = landmarks_dir()
GROUP = "berlin_berliner_dom"
INDEXED = {"web-dom-01": f"{GROUP}/01.jpg", "web-dom-03": f"{GROUP}/03.jpg",
           "web-arch": "cyprus_stone_arch_ruin/DSC_6466.JPG"}
QUERY = f"{GROUP}/02.jpg"
# Other tests index landmarks-dev (this query and its partners too) in the shared system:
# this module's photos carry this metadata, and its searches filter on it.
SUITE = "suite=web-console"
WAIT_MS = 300_000
# The page is polled from Python (polling.wait_for): the console's CSP (script-src 'self')
# refuses the string evaluation that Playwright's wait_for_function uses while it polls.


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    if ROOT is None:
        pytest.skip("../shared/data/landmarks-dev is not present")
    folder = tmp_path_factory.mktemp("web-photos")
    for image_id, rel in INDEXED.items():
        shutil.copy(ROOT / rel, folder / f"{image_id}.jpg")
    return folder


@pytest.fixture(scope="module")
def page(browser, system):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete ... from the index?"
    page.goto(system.http_url + "/")
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def ingested(page, photos, system):
    """The three photos ingested through the console's ingest page."""
    page.get_by_role("button", name="Ingest").click()
    page.get_by_label("Photos", exact=True).set_input_files(sorted(str(p) for p in photos.iterdir()))
    page.get_by_label("Metadata for every photo").fill(SUITE)
    page.get_by_role("button", name="Start job").click()
    page.wait_for_selector("#ingest-status[data-state]", timeout=WAIT_MS)
    yield page.locator("#ingest-status").get_attribute("data-state")
    http = Http(system.http_url)
    for image_id in INDEXED:
        http("DELETE", f"/api/v1/images/{image_id}")


@pytest.mark.landmarks
def test_an_ingest_job_runs_to_completion_with_its_progress_bar(page, ingested):
    assert ingested == "COMPLETED"
    assert "3 indexed, 0 failed of 3" in page.locator("#ingest-status").inner_text()
    progress = page.locator("#ingest-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "3"


@pytest.mark.landmarks
def test_dropping_a_photo_ranks_its_partner_first_outlined(page, ingested):
    page.get_by_role("button", name="Search", exact=True).first.click()
    page.get_by_label("Photo", exact=True).set_input_files(str(ROOT / QUERY))
    page.locator("#search-filter").fill(SUITE)
    page.locator("#search-go").click()
    first = page.locator("#results li").first
    first.wait_for(timeout=WAIT_MS)
    assert first.get_attribute("data-image-id") in ("web-dom-01", "web-dom-03")
    assert first.get_attribute("data-verified") == "true"
    assert "verified" in first.inner_text()
    page.wait_for_selector("#results li:first-child[data-outlined='true'] polygon", timeout=60_000)
    assert first.locator("img").get_attribute("alt").startswith("Thumbnail of web-dom-")

    first.get_by_role("button", name="Show correspondences").click()
    page.wait_for_selector("#evidence:not([hidden])", timeout=WAIT_MS)
    title = page.locator("#evidence-title").inner_text()
    assert "inliers" in title and " 0 inliers" not in title


@pytest.mark.landmarks
def test_a_region_drawn_on_the_photo_is_searched(page, ingested):
    page.get_by_role("button", name="Search", exact=True).first.click()
    page.get_by_label("Photo", exact=True).set_input_files(str(ROOT / QUERY))
    page.locator("#search-filter").fill(SUITE)
    shown = page.locator("#query-img")
    shown.wait_for()
    wait_for(lambda: shown.evaluate("img => img.naturalWidth") > 0, "the query photo shown")
    box = shown.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.7, steps=5)
    page.mouse.up()
    region = [float(v) for v in page.get_by_label("Region").input_value().split(",")]
    assert len(region) == 4 and region[2] > region[0] and region[3] > region[1]
    page.locator("#search-go").click()
    page.wait_for_selector("#search-status:has-text('region')", timeout=WAIT_MS)
    assert page.locator("#results li").first.get_attribute("data-image-id") in ("web-dom-01", "web-dom-03")


@pytest.mark.landmarks
def test_deleting_a_match_removes_it_from_the_index(page, ingested, system):
    card = page.locator("#results li[data-image-id='web-arch']")
    if not card.count():  # not among the matches of the last search: search with it
        page.get_by_label("Photo", exact=True).set_input_files(str(ROOT / INDEXED["web-arch"]))
        page.locator("#search-go").click()
        card.wait_for(timeout=WAIT_MS)
    card.get_by_role("button", name="Delete web-arch").click()
    page.wait_for_selector("#search-status:has-text('Deleted web-arch')", timeout=60_000)
    assert Http(system.http_url).get("/api/v1/images/web-arch").status_code == 404


@pytest.mark.landmarks
@needs_listing
def test_the_collection_page_shows_thumbnails_ids_and_pages(page, ingested):
    page.get_by_role("button", name="Collection").click()
    page.locator("#collection-filter").fill("path=web-dom-01.jpg")
    page.locator("#collection-form button[type=submit]").click()
    page.wait_for_selector("#collection li[data-image-id='web-dom-01']", timeout=60_000)
    assert page.locator("#collection li").count() == 1
    assert page.locator("#collection li img").get_attribute("alt") == "Thumbnail of web-dom-01"
    # Pages of one among this module's photos: "next" is enabled once that first page has
    # loaded (the filtered page above had no next), and the next page starts after it.
    page.locator("#collection-filter").fill(SUITE)
    page.get_by_label("Per page").fill("1")
    page.locator("#collection-form button[type=submit]").click()
    page.locator("#page-next").click(timeout=60_000)
    status = page.locator("#collection-status")
    wait_for(lambda: " after " in status.inner_text(), "the second page of the collection")
    first = status.inner_text().split(" after ", 1)[1]
    assert first.startswith("web-") and page.locator("#collection li").count() == 1
    assert page.locator("#collection li").first.get_attribute("data-image-id") > first


def test_the_api_documentation_renders_offline(browser, system):
    """/docs draws every route from /openapi.json with files of the service's own (no CDN)."""
    context = browser.new_context()
    page = context.new_page()
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(system.http_url) else elsewhere.append(r.url))
    page.goto(system.http_url + "/docs")
    page.wait_for_selector(".opblock", timeout=60_000)
    shown = page.locator(".opblock-summary-path").all_inner_texts()
    context.close()
    assert any("/api/v1/search" in p for p in shown) and any("/api/v1/jobs" in p for p in shown)
    assert not elsewhere, elsewhere
