"""The demo in real headless Chromium (Playwright): compare four methods, change sigma, generate again.

Needs a Chromium binary (Debian's /usr/bin/chromium, or $CHROMIUM). Without one the test is skipped,
unless REQUIRE_BROWSER=1, where that is a failure. Screenshots go to tests/artifacts/.
"""

import os

import pytest

from app_server import ARTIFACTS, running_demo

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
TIMEOUT = 60_000  # ms; a request on the tiny model takes about a second


@pytest.fixture(scope="module")
def page():
    problem = None
    if not os.path.exists(CHROMIUM):
        problem = f"no Chromium at {CHROMIUM}"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed"
    if problem:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(f"REQUIRE_BROWSER is set but {problem}")
        pytest.skip(problem)
    _, url = running_demo()
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        page.wait_for_selector("#prompt textarea")
        yield page
        browser.close()


def shot(page, name):
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    return path


def test_compare_then_change_sigma_and_generate(page):
    # The tiny model announces itself.
    assert "random weights" in page.inner_text("#model-banner")

    page.fill("#prompt textarea", "a jellyfish playing the drums")
    page.get_by_role("tab", name="Compare").click()
    page.click("#compare-button")
    page.wait_for_function("document.querySelectorAll('#compare-gallery img').length >= 4")
    page.wait_for_selector("#compare-info table")
    captions = page.inner_text("#compare-gallery")
    for label in ("Vanilla SDXL", "SAG", "PAG", "SEG"):
        assert label in captions
    assert "UNet evals" in captions
    page.wait_for_selector("#compare-slider img")
    page.wait_for_timeout(500)  # let images finish painting
    compare_shot = shot(page, "compare.png")
    page.screenshot(path=os.path.join(ARTIFACTS, "compare-viewport.png"))  # README candidate

    # Generate with sigma infinite, then move the log2 slider to 2 (sigma 4) and generate again.
    page.get_by_role("tab", name="Generate").click()
    page.click("#generate-button")
    page.wait_for_function("document.querySelector('#result-info').innerText.includes('σ inf')")
    first_src = page.get_attribute("#result img", "src")
    shot(page, "generate-infinite.png")

    number = page.locator("#log2-sigma input[type=number]")
    number.fill("2")
    number.press("Enter")
    page.wait_for_function("!document.querySelector('#infinite-sigma input').checked")
    page.wait_for_function("document.querySelector('#log2-sigma').innerText.includes('σ = 4')")
    page.click("#generate-button")
    page.wait_for_function("document.querySelector('#result-info').innerText.includes('σ 4')")
    page.wait_for_function(f"document.querySelector('#result img').src !== {first_src!r}")
    assert "UNet evaluations" in page.inner_text("#result-info")
    shot(page, "generate-sigma4.png")
    assert os.path.getsize(compare_shot) > 10_000
