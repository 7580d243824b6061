"""The demo in real headless Chromium (Playwright), as a person uses it: every tab and accordion opens
without a page error, and every control is driven through to a generated image whose displayed pixels
equal a direct library call with the same settings (ControlNet canny from an uploaded image included,
in Generate, Compare and Sweep).

Needs Chromium (Debian's /usr/bin/chromium, or $CHROMIUM) and Playwright; without them the test fails and
says how to install them (a skipped browser test would hide a broken UI). Screenshots: tests/artifacts/.
"""

import io
import os

import numpy as np
import pytest
from PIL import Image

from app_server import ARTIFACTS, grid_cells, library_image, running_demo

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
TIMEOUT = 60_000  # ms; a request on the tiny model takes about a second
INSTALL = ("install Chromium with `sudo apt-get install chromium` (Debian/Ubuntu; or point $CHROMIUM at a "
           "Chromium binary) and Playwright with `pip install -r requirements-dev.txt`")


def browser_problem() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"the browser test needs Chromium, and there is none at {CHROMIUM}: {INSTALL}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"the browser test needs the playwright package: {INSTALL}"
    return None


@pytest.fixture(scope="module")
def browser():
    problem = browser_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Page:
    """A page of the demo that records every page error and console error."""

    def __init__(self, browser, width=1400, height=1000):
        self.demo, url = running_demo()
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.set_default_timeout(TIMEOUT)
        self.errors = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console error: {m.text}"))
        self.page.goto(url)
        self.page.wait_for_selector("#prompt textarea")

    def no_errors(self):
        assert self.errors == [], self.errors

    def shot(self, name, full_page=True):
        self.page.screenshot(path=os.path.join(ARTIFACTS, name), full_page=full_page)

    def number(self, elem_id, value):
        """Type into a slider's or number's box, as a person does."""
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def pixels(self, selector, index=0):
        """The pixels of a displayed image, fetched from its src as the browser shows it."""
        source = self.page.locator(selector).nth(index).get_attribute("src")
        body = self.page.request.get(source).body()
        return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))

    def click_and_wait_for_image(self, button, selector, count=1):
        """Click, then wait until ``count`` images under ``selector`` show new files (their src changed)."""
        page = self.page
        before = page.eval_on_selector_all(f"{selector} img", "els => els.map(e => e.src)")
        page.click(button)
        page.wait_for_function(
            """([sel, before, count]) => {
                const now = [...document.querySelectorAll(sel + ' img')].map(e => e.src);
                return now.length >= count && now.slice(0, count).every(s => s && !before.includes(s));
            }""", arg=[selector, before, count])
        page.wait_for_timeout(300)


@pytest.fixture(scope="module")
def ui(browser):
    page = Page(browser)
    yield page
    page.page.close()


def library(demo, control_type="none", **kwargs):
    return library_image(demo.studio.pipeline(control_type), **kwargs)


def control_pattern(tmp_path):
    """An upload with edges Canny finds: a white square and a disc on grey."""
    image = np.full((120, 160, 3), 90, np.uint8)
    image[20:80, 20:80] = 255
    yy, xx = np.mgrid[:120, :160]
    image[(yy - 70) ** 2 + (xx - 115) ** 2 < 30**2] = (200, 40, 40)
    path = tmp_path / "pattern.png"
    Image.fromarray(image).save(path)
    return str(path)


def test_every_tab_and_accordion_renders_without_page_errors(ui):
    page = ui.page
    assert "random weights" in page.inner_text("#model-banner")
    for name in ("Advanced", "ControlNet"):
        page.get_by_text(name, exact=True).first.click()
    for elem_id in ("applied-layers", "guidance-start", "guidance-end", "sag-scale", "pag-scale", "control-type",
                    "control-image", "control-map", "control-examples", "controlnet-scale"):
        assert page.locator(f"#{elem_id}").is_visible(), elem_id
    assert page.locator("#control-type").get_by_text("canny").is_visible()
    assert page.locator("#control-image").get_by_text("Control image").is_visible()
    for tab, elem_id in (("Compare", "compare-button"), ("Sweep", "sweep-button"), ("Generate", "generate-button")):
        page.get_by_role("tab", name=tab).click()
        assert page.locator(f"#{elem_id}").is_visible(), tab
    page.wait_for_timeout(500)
    ui.shot("tabs-and-accordions.png")
    ui.no_errors()


def test_generate_follows_every_setting_pixel_for_pixel(ui):
    page, demo = ui.page, ui.demo
    page.fill("#prompt textarea", "a corgi")
    page.fill("#negative-prompt textarea", "blurry")
    ui.number("seg-scale", 2)
    ui.number("cfg-scale", 2.5)
    ui.number("log2-sigma", 2)  # σ 4: unticks "infinite σ"
    page.wait_for_function("!document.querySelector('#infinite-sigma input').checked")
    page.click("#size input")
    page.get_by_role("option", name="72×56").click()
    ui.number("steps", 3)
    page.fill("#seed input", "11")
    page.locator("#applied-layers input").fill("u1")
    page.locator("#applied-layers input").press("Enter")
    ui.number("guidance-start", 0.3)
    ui.number("guidance-end", 0.9)
    ui.click_and_wait_for_image("#generate-button", "#result")
    settings = dict(prompt="a corgi", negative_prompt="blurry", seed=11, num_inference_steps=3, width=72,
                    height=56, guidance_scale=2.5, seg_scale=2.0, seg_blur_sigma=4.0,
                    seg_applied_layers=["mid", "u1"], perturbation_guidance_start=0.3,
                    perturbation_guidance_end=0.9)
    shown = ui.pixels("#result img")
    assert np.array_equal(shown, library(demo, **settings))
    assert "σ 4" in page.inner_text("#result-info") and "seed **11**" not in page.inner_text("#result-info")
    ui.shot("generate-sigma4.png")

    # Ticking "infinite σ" puts the slider at its top (∞) and changes the image accordingly.
    page.locator("#infinite-sigma input").check()
    page.wait_for_function("document.querySelector('#log2-sigma input[type=number]').value === '14'")
    ui.click_and_wait_for_image("#generate-button", "#result")
    infinite = ui.pixels("#result img")
    assert not np.array_equal(infinite, shown)
    assert np.array_equal(infinite, library(demo, **{**settings, "seg_blur_sigma": float("inf")}))

    # "New seed" and "random seed each run": the seed shown is the one used.
    page.click("#new-seed")
    page.wait_for_function("document.querySelector('#seed input').value !== '11'")
    page.locator("#randomize-seed input").check()
    ui.click_and_wait_for_image("#generate-button", "#result")
    seed = int(page.input_value("#seed input"))
    assert np.array_equal(ui.pixels("#result img"),
                          library(demo, **{**settings, "seg_blur_sigma": float("inf"), "seed": seed}))
    page.locator("#randomize-seed input").uncheck()
    ui.no_errors()


def test_controlnet_canny_from_an_upload_in_generate_compare_and_sweep(ui, tmp_path):
    page, demo = ui.page, ui.demo
    upload = control_pattern(tmp_path)
    page.fill("#seed input", "5")
    page.locator("#control-type").get_by_text("canny").click()
    page.set_input_files("#control-image input[type=file]", upload)
    page.wait_for_selector("#control-map img")
    page.wait_for_timeout(500)
    control_map = ui.pixels("#control-map img")
    assert control_map.shape == (56, 72, 3) and control_map.max() == 255 and control_map.min() == 0
    ui.number("controlnet-scale", 0.7)
    ui.shot("controlnet.png")

    settings = dict(prompt="a corgi", negative_prompt="blurry", seed=5, num_inference_steps=3, width=72, height=56,
                    guidance_scale=2.5, seg_scale=2.0, seg_blur_sigma=float("inf"), seg_applied_layers=["mid", "u1"],
                    perturbation_guidance_start=0.3, perturbation_guidance_end=0.9,
                    controlnet_conditioning_scale=0.7, control_image=upload)
    ui.click_and_wait_for_image("#generate-button", "#result")
    assert np.array_equal(ui.pixels("#result img"), library(demo, "canny", **settings))

    page.get_by_role("tab", name="Compare").click()
    ui.number("sag-scale", 0.8)
    ui.number("pag-scale", 2.5)
    ui.click_and_wait_for_image("#compare-button", "#compare-gallery", count=4)
    page.wait_for_selector("#compare-info table")
    captions = page.inner_text("#compare-gallery")
    assert "Vanilla" in captions and "Vanilla SDXL" not in captions  # the tiny model is not SDXL
    base = {**settings, "pag_applied_layers": ["mid", "u1"]}
    methods = [dict(seg_scale=0.0), dict(seg_scale=0.0, sag_scale=0.8), dict(seg_scale=0.0, pag_scale=2.5), {}]
    for k, change in enumerate(methods):
        shown = ui.pixels("#compare-gallery .grid-container img", k)
        assert np.array_equal(shown, library(demo, "canny", **{**base, **change})), change
    # The pair slider: its dropdowns pick two of the four.
    page.click("#slider-left input")
    page.get_by_role("option", name="PAG (scale 2.5)").click()
    page.wait_for_timeout(800)
    left = ui.pixels("#compare-slider img", 0)
    assert np.array_equal(left, library(demo, "canny", **{**base, **methods[2]}))
    ui.shot("compare.png")
    page.screenshot(path=os.path.join(ARTIFACTS, "compare-viewport.png"))  # README candidate

    page.get_by_role("tab", name="Sweep").click()
    page.fill("#sweep-sigmas textarea", "2, inf")
    ui.click_and_wait_for_image("#sweep-button", "#sweep-grid")
    grid = ui.pixels("#sweep-grid img")
    expected = [[library(demo, "canny", **{**settings, "seg_blur_sigma": sigma}) for sigma in (2.0, float("inf"))]]
    shown, drawn = grid_cells(grid, expected)
    assert np.array_equal(shown, drawn)
    ui.shot("sweep.png")
    ui.no_errors()


def test_example_control_image_and_prompt_example(ui):
    page, demo = ui.page, ui.demo
    page.get_by_role("tab", name="Generate").click()
    page.locator("#control-examples img").first.click()  # the house
    page.wait_for_timeout(1500)
    page.locator("#examples").get_by_text("a jellyfish playing the drums").click()
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'a jellyfish playing the drums'")
    ui.click_and_wait_for_image("#generate-button", "#result")
    settings = dict(prompt="a jellyfish playing the drums", negative_prompt=None, seed=5, num_inference_steps=3,
                    width=72, height=56, guidance_scale=1.0, seg_scale=2.0, seg_blur_sigma=float("inf"),
                    seg_applied_layers=["mid", "u1"], perturbation_guidance_start=0.3, perturbation_guidance_end=0.9,
                    controlnet_conditioning_scale=0.7, control_image="assets/control_house.png")
    assert np.array_equal(ui.pixels("#result img"), library(demo, "canny", **settings))
    ui.no_errors()


def test_a_refusal_reaches_the_page_as_a_readable_message(ui):
    page = ui.page
    page.locator("#control-type").get_by_text("none").click()
    ui.number("steps", 1)
    page.fill("#seed input", "1")
    page.get_by_role("tab", name="Sweep").click()
    page.fill("#sweep-sigmas textarea", "1, abc")
    page.click("#sweep-button")
    toast = page.locator(".toast-body").first
    toast.wait_for()
    assert "blur σ values: bad value 'abc'" in toast.inner_text()
    ui.errors.clear()  # Gradio logs the refused event to the console; the message above is what counts


def test_a_phone_sees_the_buttons_and_all_four_images(browser):
    phone = Page(browser, width=390, height=844)
    page = phone.page
    assert page.get_by_role("tab", name="Generate").bounding_box()["y"] < page.locator("#prompt").bounding_box()["y"]
    assert page.locator("#generate-button").bounding_box()["y"] < page.locator("#prompt").bounding_box()["y"]
    page.get_by_role("tab", name="Compare").click()
    phone.click_and_wait_for_image("#compare-button", "#compare-gallery", count=4)
    for k in range(4):
        box = page.locator("#compare-gallery .grid-container img").nth(k).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["height"] > 100, (k, box)
    phone.shot("phone-compare.png", full_page=False)
    phone.no_errors()
    page.close()
