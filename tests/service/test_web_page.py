"""The web page end to end: the real app on a loopback port, driven by Debian's Chromium through Playwright.

What a radiologist trying the model would notice: the model card's warning, the findings sorted by
probability with a decision chip each, the refer banner, the Grad-CAM overlay and its opacity, the
server-rendered preview of a DICOM the browser cannot show, and a plain-words error for a file that is
not an image. With the shipped demo model: on a laptop screen the film and the verdict are on screen after
an upload without scrolling; on a phone the verdict scrolls into view, bars are comparable and a highlighted
row stays whole; the film zooms, pans and takes a window/level; the bars draw the referral rule's own
thresholds; a film the model was not made for shows no numbers at all. Screenshots land in ``tmp_path``
and, when ``CXR_TEST_ARTIFACTS`` is set, are copied there.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from bayesnet import ModelSpec, build_model, save_checkpoint

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ORIGINALS = SHARED_DATA / "originals"
RADIOGRAPH_PNG = ORIGINALS / "00000075_000.png"
RADIOGRAPH_DICOM = ORIGINALS / "siim-chest-cr-jpeg-baseline.dcm"
NIH_PNG = SHARED_DATA / "nih-cxr14-sample" / "images" / "00007833_000.png"
DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo"
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
NO_CLEARING = "This model cannot rule out any finding at the stated guarantee; every film goes to a radiologist."
DECISIONS = {"Positive": "positive", "Negative": "negative", "Uncertain": "uncertain"}
RESULT_TIMEOUT_MS = 60_000

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

try:
    from tests.service.live import LiveServer, live_server, tiny_settings
except ImportError as err:  # the service is written in parallel with this page
    pytest.skip(f"service app not available yet ({err})", allow_module_level=True)


@pytest.fixture(scope="module")
def model_card(server: LiveServer) -> dict[str, Any]:
    with server.client() as client:
        response = client.get("/v1/model")
    response.raise_for_status()
    card: dict[str, Any] = response.json()
    return card


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class ConsoleErrors(list[str]):
    """Browser console errors and uncaught page errors, collected while a test runs."""

    def unexpected(self, *allowed: str) -> list[str]:
        return [message for message in self if not any(fragment in message for fragment in allowed)]


@contextmanager
def _open_page(browser: Any, url: str, viewport: dict[str, int] | None = None) -> Iterator[tuple[Any, ConsoleErrors]]:
    context = browser.new_context(viewport=viewport or {"width": 1366, "height": 900}, base_url=url)
    context.set_default_timeout(RESULT_TIMEOUT_MS)
    page = context.new_page()
    errors = ConsoleErrors()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    try:
        yield page, errors
    finally:
        context.close()


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[tuple[Any, ConsoleErrors]]:
    with _open_page(browser, server.url) as opened:
        yield opened


@pytest.fixture(scope="module")
def demo_server() -> Iterator[LiveServer]:
    """The shipped demo model: a fitted referral rule (that clears nothing) and an out-of-distribution gate."""
    if not (DEMO_MODEL / "ood.safetensors").is_file():
        pytest.skip("models/demo has no OOD gate")
    with live_server(tiny_settings(DEMO_MODEL)) as live:
        yield live


@pytest.fixture(scope="module")
def demo_card(demo_server: LiveServer) -> dict[str, Any]:
    with demo_server.client() as client:
        response = client.get("/v1/model")
    response.raise_for_status()
    card: dict[str, Any] = response.json()
    return card


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[..., Path]:
    """Save a screenshot (the whole page, or only what is on screen) to tmp_path and, if CXR_TEST_ARTIFACTS is
    set, copy it there."""
    target = os.environ.get("CXR_TEST_ARTIFACTS")

    def save(page: Any, name: str, *, full_page: bool = True) -> Path:
        path = tmp_path / name
        page.screenshot(path=str(path), full_page=full_page)
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, Path(target) / name)
        return path

    return save


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real radiograph {path} is absent (only present on the project's machines)")
    return path


def _by_testid(page: Any, testid: str) -> Any:
    return page.get_by_test_id(testid)


def _open(page: Any, card: dict[str, Any]) -> None:
    page.goto("/")
    note = _by_testid(page, "model-note")
    sync_api.expect(_by_testid(page, "model-name")).to_have_text(card["name"])
    sync_api.expect(note).to_contain_text(card["intended_use"])
    warning = _by_testid(page, "untrained-warning")
    if card["trained"]:
        sync_api.expect(warning).to_be_hidden()
    else:
        sync_api.expect(warning).to_have_text("This is an untrained placeholder model: its outputs are meaningless.")
    for label in card["untrained_labels"]:
        sync_api.expect(_by_testid(page, "untrained-labels")).to_contain_text(label)


def _wait_for_results(page: Any) -> Any:
    rows = _by_testid(page, "finding-row")
    sync_api.expect(_by_testid(page, "results")).to_have_attribute("aria-busy", "false")
    sync_api.expect(rows.first).to_be_visible()
    return rows


def _natural_width(locator: Any) -> int:
    width: int = locator.evaluate("img => img.complete ? img.naturalWidth : 0")
    return width


def _box(locator: Any) -> dict[str, float]:
    box: dict[str, float] | None = locator.bounding_box()
    assert box is not None, "element is not rendered"
    return box


def _on_screen(box: dict[str, float], viewport: dict[str, int]) -> bool:
    """The whole box is inside the viewport (0.5 px tolerance for subpixel layout)."""
    return (
        box["x"] >= -0.5
        and box["y"] >= -0.5
        and box["x"] + box["width"] <= viewport["width"] + 0.5
        and box["y"] + box["height"] <= viewport["height"] + 0.5
    )


def _upload(page: Any, path: Path) -> dict[str, Any]:
    """Choose ``path`` in the file input; wait for the page to show the answer; return the predict JSON."""
    with page.expect_response(lambda response: "/v1/predict" in response.url) as answer:
        _by_testid(page, "file-input").set_input_files(str(path))
    body: dict[str, Any] = answer.value.json()
    sync_api.expect(_by_testid(page, "results")).to_have_attribute("aria-busy", "false")
    sync_api.expect(_by_testid(page, "verdict")).to_be_visible()
    return body


def _wait_for_film(page: Any) -> Any:
    film = _by_testid(page, "radiograph")
    sync_api.expect(film).to_be_visible()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=film.element_handle())
    return film


def _photo(tmp_path: Path) -> Path:
    from skimage.data import chelsea

    from train.ood import png_bytes

    photo = tmp_path / "cat.png"
    photo.write_bytes(png_bytes(chelsea()))
    return photo


def _whole_percent(p: float) -> str:
    """A probability as the page writes a range end: whole percent, rounded half up, "<1" below 1%."""
    return "<1" if 0 < p < 0.01 else str(math.floor(p * 100 + 0.5))


def _grey_spread(png: bytes) -> float:
    """Standard deviation of the grey levels of a screenshot: how much contrast is on screen."""
    import io

    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64).std())


def test_png_upload_shows_sorted_findings_and_heatmap(
    page: tuple[Any, ConsoleErrors], model_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    browser_page, errors = page
    radiograph = _need(RADIOGRAPH_PNG)
    _open(browser_page, model_card)

    # Keyboard users reach the file picker with Tab.
    for _ in range(10):
        browser_page.keyboard.press("Tab")
        if browser_page.evaluate("document.activeElement && document.activeElement.dataset.testid") == "file-input":
            break
    else:
        pytest.fail("the file input is not reachable with the keyboard")

    _by_testid(browser_page, "file-input").set_input_files(str(radiograph))
    rows = _wait_for_results(browser_page)

    trained = model_card["trained_labels"]
    sync_api.expect(rows).to_have_count(len(trained))
    labels = [rows.nth(i).get_attribute("data-label") for i in range(rows.count())]
    assert sorted(labels) == sorted(trained)
    shown = [float(text.rstrip("%")) for text in _by_testid(browser_page, "finding-conf").all_inner_texts()]
    assert shown == sorted(shown, reverse=True), f"findings are not sorted by confidence: {shown}"
    confs = [float(rows.nth(i).get_attribute("data-conf")) for i in range(rows.count())]
    assert confs == sorted(confs, reverse=True)

    chips = _by_testid(browser_page, "decision-chip")
    sync_api.expect(chips).to_have_count(len(trained))
    decisions = []
    for i in range(chips.count()):
        text = chips.nth(i).inner_text().strip()
        assert text in DECISIONS, f"decision chip says {text!r}"
        assert chips.nth(i).get_attribute("data-decision") == DECISIONS[text]
        decisions.append(DECISIONS[text])
    refer = _by_testid(browser_page, "refer-banner")
    if model_card.get("referral") is None:
        # No fitted rule: every film is referred, the page says why, and the model note says so up front.
        sync_api.expect(refer).to_contain_text("Refer: a radiologist should review this image.")
        sync_api.expect(_by_testid(browser_page, "refer-reasons")).to_contain_text("no fitted referral rule")
        sync_api.expect(_by_testid(browser_page, "cleared-banner")).to_be_hidden()
    if "uncertain" in decisions:
        sync_api.expect(_by_testid(browser_page, "refer-reasons")).to_contain_text(
            "a finding could be neither cleared nor called positive"
        )

    sync_api.expect(_by_testid(browser_page, "run-meta")).to_contain_text("Monte-Carlo samples")
    image = _by_testid(browser_page, "radiograph")
    sync_api.expect(image).to_be_visible()
    assert _natural_width(image) > 0

    select = _by_testid(browser_page, "cam-select")
    overlay = _by_testid(browser_page, "cam-overlay")
    cam_labels = [value for value in select.locator("option").evaluate_all("os => os.map(o => o.value)")]
    if len(cam_labels) > 1:
        assert cam_labels[0] == "none" and set(cam_labels[1:]) <= set(trained)
        chosen = cam_labels[-1]
        select.select_option(chosen)
        _by_testid(browser_page, "cam-opacity").fill("70")
        sync_api.expect(overlay).to_be_visible()
        sync_api.expect(overlay).to_have_css("opacity", "0.7")
        sync_api.expect(overlay).to_have_attribute("alt", f"Grad-CAM heatmap for {chosen}")
        sync_api.expect(_by_testid(browser_page, "cam-opacity-value")).to_have_text("70%")
        browser_page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=overlay.element_handle())
        # The heatmap covers exactly the displayed radiograph.
        box, cam_box = image.bounding_box(), overlay.bounding_box()
        assert box is not None and cam_box is not None
        for key in ("x", "y", "width", "height"):
            assert abs(box[key] - cam_box[key]) <= 1, f"overlay {cam_box} does not cover the radiograph {box}"
        screenshot(browser_page, "web-page-results.png")
        select.select_option("none")
        sync_api.expect(overlay).to_be_hidden()
    else:
        sync_api.expect(_by_testid(browser_page, "cam-empty")).to_have_text("No heatmaps requested/available.")
        screenshot(browser_page, "web-page-results.png")

    # Responsive: on a phone-sized screen nothing overflows sideways.
    browser_page.set_viewport_size({"width": 390, "height": 844})
    assert browser_page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    screenshot(browser_page, "web-page-mobile.png")

    assert errors.unexpected() == []


def test_dicom_upload_shows_the_server_rendered_preview(
    page: tuple[Any, ConsoleErrors], model_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    browser_page, errors = page
    dicom = _need(RADIOGRAPH_DICOM)
    _open(browser_page, model_card)

    _by_testid(browser_page, "file-input").set_input_files(str(dicom))
    rows = _wait_for_results(browser_page)
    sync_api.expect(rows).to_have_count(len(model_card["trained_labels"]))
    image = _by_testid(browser_page, "radiograph")
    sync_api.expect(image).to_be_visible()
    browser_page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=image.element_handle())
    assert (image.get_attribute("src") or "").startswith("blob:")
    sync_api.expect(_by_testid(browser_page, "image-info")).to_contain_text("DICOM")
    screenshot(browser_page, "web-page-dicom.png")

    assert errors.unexpected() == []


def test_dropped_text_file_explains_the_problem(
    page: tuple[Any, ConsoleErrors], model_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    browser_page, errors = page
    _open(browser_page, model_card)

    # Dropped on the drop zone, named like a PNG: the service sniffs the content, not the name.
    dropped = browser_page.evaluate_handle(
        """text => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], "notes.png", { type: "image/png" }));
            return transfer;
        }""",
        "Patient notes, not an image.\n" * 20,
    )
    dropzone = _by_testid(browser_page, "dropzone")
    dropzone.dispatch_event("dragenter", {"dataTransfer": dropped})
    dropzone.dispatch_event("drop", {"dataTransfer": dropped})
    error = _by_testid(browser_page, "error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text("Not an image format the service reads")
    sync_api.expect(_by_testid(browser_page, "error-detail")).not_to_be_empty()
    sync_api.expect(_by_testid(browser_page, "error-suggestion")).to_contain_text("PNG, JPEG or DICOM")
    sync_api.expect(_by_testid(browser_page, "error-request-id")).to_contain_text("Request ID: ")
    sync_api.expect(_by_testid(browser_page, "status")).to_contain_text("failed")
    sync_api.expect(_by_testid(browser_page, "finding-row")).to_have_count(0)
    screenshot(browser_page, "web-page-error.png")

    assert errors.unexpected("status of 415") == []


def test_untrained_placeholder_is_flagged(browser: Any, tmp_path: Path, screenshot: Callable[..., Path]) -> None:
    torch.manual_seed(0)
    untrained = build_model(ModelSpec(arch="test_efficientnet", image_size=64))  # provenance "untrained: ..."
    checkpoint = save_checkpoint(untrained, None, tmp_path / "untrained")
    with live_server(tiny_settings(checkpoint)) as live, _open_page(browser, live.url) as (browser_page, errors):
        with live.client() as client:
            card = client.get("/v1/model").json()
        assert card["trained"] is False
        _open(browser_page, card)
        sync_api.expect(_by_testid(browser_page, "untrained-warning")).to_be_visible()
        screenshot(browser_page, "web-page-untrained.png")
        assert errors.unexpected() == []


@pytest.fixture
def demo_page(
    browser: Any, demo_server: LiveServer, request: pytest.FixtureRequest
) -> Iterator[tuple[Any, ConsoleErrors]]:
    """A page on the demo server, at the viewport the test is parametrised with (a laptop by default)."""
    viewport = getattr(request, "param", LAPTOP)
    with _open_page(browser, demo_server.url, viewport) as opened:
        yield opened


def test_laptop_shows_film_and_verdict_without_scrolling(
    demo_page: tuple[Any, ConsoleErrors], demo_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    """1280x900: after an upload the film and the verdict are both on screen, the verdict has the focus, the
    model card stays one collapsed line, and the heatmap has its colour scale."""
    browser_page, errors = demo_page
    radiograph = _need(NIH_PNG)
    _open(browser_page, demo_card)
    note = _by_testid(browser_page, "model-note")
    assert note.evaluate("details => details.open") is False, "the model card should start collapsed"
    sync_api.expect(_by_testid(browser_page, "model-intended-use")).to_be_hidden()

    _upload(browser_page, radiograph)
    film = _wait_for_film(browser_page)
    verdict = _by_testid(browser_page, "verdict")
    sync_api.expect(_by_testid(browser_page, "refer-banner")).to_be_visible()
    assert browser_page.evaluate("window.scrollY") == 0, "the page scrolled on a laptop screen"
    assert _on_screen(_box(film), LAPTOP), f"the film {_box(film)} is not wholly on screen"
    assert _on_screen(_box(verdict), LAPTOP), f"the verdict {_box(verdict)} is not wholly on screen"
    # The verdict is what is read first after an upload: it has the focus.
    assert browser_page.evaluate("document.activeElement.dataset.testid") == "verdict"
    assert note.evaluate("details => details.open") is False

    # The heatmap shown comes with its colour scale, on screen beside the film.
    sync_api.expect(_by_testid(browser_page, "cam-overlay")).to_be_visible()
    scale = _by_testid(browser_page, "cam-scale")
    sync_api.expect(scale).to_be_visible()
    sync_api.expect(scale).to_contain_text("Grad-CAM relevance")
    sync_api.expect(scale).to_contain_text("low")
    sync_api.expect(scale).to_contain_text("high")
    ramp = scale.locator(".cam-scale__ramp").evaluate("el => getComputedStyle(el).backgroundImage")
    assert "linear-gradient" in ramp
    assert _on_screen(_box(scale), LAPTOP)
    screenshot(browser_page, "web-page-laptop.png", full_page=False)

    _by_testid(browser_page, "cam-select").select_option("none")
    sync_api.expect(scale).to_be_hidden()
    assert errors.unexpected() == []


@pytest.mark.parametrize("demo_page", [PHONE], indirect=True)
def test_phone_scrolls_to_the_verdict_and_keeps_bars_comparable(
    demo_page: tuple[Any, ConsoleErrors], demo_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    """390x844: the verdict comes into view by itself; every bar track has the same width (a row with a
    Heatmap button included), so equal percentages draw equal bars; the highlighted row is one box."""
    browser_page, errors = demo_page
    radiograph = _need(NIH_PNG)
    _open(browser_page, demo_card)
    _upload(browser_page, radiograph)

    verdict = _by_testid(browser_page, "verdict")
    sync_api.expect(verdict).to_be_in_viewport(ratio=1)
    assert browser_page.evaluate("window.scrollY") > 0, "the verdict was on screen without scrolling: test is void"
    # The scroll ends with the verdict at the top of the screen, where reading starts.
    browser_page.wait_for_function(
        "el => { const top = el.getBoundingClientRect().top; return top >= 0 && top <= 40; }",
        arg=verdict.element_handle(),
    )
    assert browser_page.evaluate("document.activeElement.dataset.testid") == "verdict"
    screenshot(browser_page, "web-page-phone.png", full_page=False)

    rows = _by_testid(browser_page, "finding-row")
    tracks: dict[str, list[float]] = {"with heatmap button": [], "without": []}
    for i in range(rows.count()):
        row = rows.nth(i)
        has_button = row.get_by_test_id("finding-cam-button").is_visible()
        bar = _box(row.get_by_test_id("finding-bar"))
        tracks["with heatmap button" if has_button else "without"].append(bar["width"])
        # The fill is the mean's share of the track.
        fill = _box(row.locator(".bar__fill"))
        conf = float(row.get_attribute("data-conf") or "nan")
        assert abs(fill["width"] - conf * bar["width"]) <= 1.0, f"row {i}: fill {fill['width']} for {conf}"
    assert tracks["with heatmap button"] and tracks["without"], f"need rows of both kinds: {tracks}"
    widths = tracks["with heatmap button"] + tracks["without"]
    assert max(widths) - min(widths) <= 0.5, f"bar tracks differ in width: {tracks}"
    assert browser_page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")

    # The row whose heatmap is shown is highlighted as one box: the row paints it, no cell paints its own.
    active = browser_page.locator("tr.finding--cam-active")
    sync_api.expect(active).to_have_count(1)
    shape = active.evaluate(
        """row => {
            const transparent = (el) => getComputedStyle(el).backgroundColor === "rgba(0, 0, 0, 0)";
            const box = row.getBoundingClientRect();
            const inside = [...row.children].every((cell) => {
                const c = cell.getBoundingClientRect();
                return c.left >= box.left - 0.5 && c.right <= box.right + 0.5
                    && c.top >= box.top - 0.5 && c.bottom <= box.bottom + 0.5;
            });
            return {
                rects: row.getClientRects().length,
                rowPainted: !transparent(row),
                cellsPainted: [...row.children].filter((cell) => !transparent(cell)).length,
                inside,
            };
        }"""
    )
    assert shape == {"rects": 1, "rowPainted": True, "cellsPainted": 0, "inside": True}, shape
    active.scroll_into_view_if_needed()
    screenshot(browser_page, "web-page-phone-rows.png", full_page=False)
    screenshot(browser_page, "web-page-phone-full.png")
    assert errors.unexpected() == []


def test_film_zooms_pans_and_takes_a_window_level(
    demo_page: tuple[Any, ConsoleErrors], demo_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    """A DICOM (shown through the server's preview): + zooms about the centre, arrow keys and a drag pan, and
    a narrower window stretches the grey levels on screen; Reset restores all three."""
    browser_page, errors = demo_page
    dicom = Path(get_testdata_file("RG1_UNCR.dcm"))
    _open(browser_page, demo_card)
    _upload(browser_page, dicom)
    film = _wait_for_film(browser_page)
    sync_api.expect(_by_testid(browser_page, "image-info")).to_contain_text("DICOM")
    window = _by_testid(browser_page, "viewer-window")
    start = _box(film)

    _by_testid(browser_page, "zoom-in").click()
    _by_testid(browser_page, "zoom-in").click()
    sync_api.expect(_by_testid(browser_page, "zoom-level")).to_have_text("156%")
    zoomed = _box(film)
    assert zoomed["width"] == pytest.approx(start["width"] * 1.5625, rel=0.01)
    # Zoomed about the centre: the centre of the film stays where it was.
    assert zoomed["x"] + zoomed["width"] / 2 == pytest.approx(start["x"] + start["width"] / 2, abs=1)

    window.focus()
    browser_page.keyboard.press("ArrowLeft")  # shows more of the film's left side: the film moves right
    panned = _box(film)
    assert panned["x"] > zoomed["x"] + 5
    view = _box(window)
    browser_page.mouse.move(view["x"] + view["width"] / 2, view["y"] + view["height"] / 2)
    browser_page.mouse.down()
    browser_page.mouse.move(view["x"] + view["width"] / 2 - 40, view["y"] + view["height"] / 2 - 30, steps=4)
    browser_page.mouse.up()
    dragged = _box(film)
    assert dragged["x"] == pytest.approx(panned["x"] - 40, abs=1)
    assert dragged["y"] == pytest.approx(panned["y"] - 30, abs=1)
    # Never dragged off: the zoomed film still covers its window.
    assert dragged["x"] <= view["x"] + 0.5 and dragged["x"] + dragged["width"] >= view["x"] + view["width"] - 0.5
    browser_page.keyboard.press("+")
    sync_api.expect(_by_testid(browser_page, "zoom-level")).to_have_text("195%")

    browser_page.keyboard.press("0")
    sync_api.expect(_by_testid(browser_page, "zoom-level")).to_have_text("100%")
    assert _box(film) == pytest.approx(start, abs=0.5)

    before = _grey_spread(window.screenshot())
    _by_testid(browser_page, "wl-window").fill("35")
    sync_api.expect(_by_testid(browser_page, "wl-window-value")).to_have_text("35%")
    sync_api.expect(film).to_have_css("filter", 'url("#window-level")')
    after = _grey_spread(window.screenshot())
    assert after > before * 1.2, f"a 35% window did not stretch the contrast: spread {before:.1f} -> {after:.1f}"
    _by_testid(browser_page, "wl-level").fill("30")
    darker_level = _grey_spread(window.screenshot())
    assert darker_level != pytest.approx(after, abs=0.5), "moving the level changed nothing"
    screenshot(browser_page, "web-page-window-level.png", full_page=False)

    _by_testid(browser_page, "view-reset").click()
    sync_api.expect(film).to_have_css("filter", "none")
    sync_api.expect(_by_testid(browser_page, "wl-window-value")).to_have_text("100%")
    assert _grey_spread(window.screenshot()) == pytest.approx(before, abs=0.5)
    assert errors.unexpected() == []


def test_bars_draw_the_rule_that_decides(
    demo_page: tuple[Any, ConsoleErrors], demo_card: dict[str, Any], screenshot: Callable[..., Path]
) -> None:
    """The marks on each bar sit at the answer's clear_below / positive_at, never at the legacy threshold;
    the demo model clears nothing, which the page says once at the top and on every finding it cannot clear.

    Needs the API's clear_below / positive_at / decided_on / reason fields and the model card's evidence."""
    browser_page, errors = demo_page
    radiograph = _need(NIH_PNG)
    _open(browser_page, demo_card)
    negative = demo_card["referral"]["negative_threshold"]
    assert all(negative[label] is None for label in demo_card["trained_labels"]), "demo model now clears"
    no_clearing = _by_testid(browser_page, "no-clearing")
    sync_api.expect(no_clearing).to_be_visible()
    sync_api.expect(no_clearing).to_have_text(NO_CLEARING)

    body = _upload(browser_page, radiograph)
    predictions = body["predictions"]
    rows = _by_testid(browser_page, "finding-row")
    sync_api.expect(rows).to_have_count(len(predictions))
    seen = {"clear": 0, "positive": 0}
    for i in range(rows.count()):
        row = rows.nth(i)
        label = row.get_attribute("data-label")
        p = predictions[label]
        for field in ("clear_below", "positive_at", "decided_on", "reason"):
            assert field in p, f"the answer has no predictions[{label!r}].{field} (backend not updated yet?)"
        track = _box(row.get_by_test_id("finding-bar"))
        for kind, field in (("clear", "clear_below"), ("positive", "positive_at")):
            mark = row.get_by_test_id(f"mark-{field.replace('_', '-')}")
            value = p[field]
            if value is None:
                sync_api.expect(mark).to_be_hidden()
                continue
            seen[kind] += 1
            box = _box(mark)
            x = box["x"] + box["width"] / 2 - track["x"]
            assert x == pytest.approx(value * track["width"], abs=1.0), f"{label}: {field} mark at {x}"
            if abs(value - p["threshold"]) * track["width"] > 2:
                assert x != pytest.approx(p["threshold"] * track["width"], abs=1.0)
        drawn = row.locator(".bar__mark:not([hidden])").evaluate_all("ms => ms.map(m => Number(m.dataset.value))")
        assert sorted(drawn) == sorted(v for v in (p["clear_below"], p["positive_at"]) if v is not None)
        if p["clear_below"] is None and p["decision"] != "positive":
            sync_api.expect(row.get_by_test_id("finding-reason")).to_have_text("cannot be ruled out by this model")
        # Words, not a variance: the 5-95% range and whether the model is unsure.
        low, high = p["interval"]
        sync_api.expect(row.get_by_test_id("finding-interval")).to_have_text(
            f"{_whole_percent(low)}–{_whole_percent(high)}%"
        )
        sync_api.expect(row.get_by_test_id("finding-sureness")).to_have_text(
            re.compile(r"^(the model is unsure|samples agree)$")
        )
        if p["decision"] == "uncertain" and p["reason"] == "between_thresholds":
            sync_api.expect(row.get_by_test_id("finding-sureness")).to_have_text("the model is unsure")
    assert seen["clear"] == 0 and seen["positive"] > 0, seen
    sync_api.expect(_by_testid(browser_page, "legend-clear")).to_be_hidden()
    sync_api.expect(_by_testid(browser_page, "legend-positive")).to_be_visible()
    assert "variance" not in _by_testid(browser_page, "results").inner_text()
    sync_api.expect(no_clearing).to_be_visible()

    # A PNG declares no age or view: never cleared, and the verdict says why.
    assert "population_unverified" in body["referral"]["reasons"]
    reasons = _by_testid(browser_page, "refer-reasons")
    sync_api.expect(reasons).to_contain_text("nothing establishes the patient's age and the view")
    sync_api.expect(reasons).to_contain_text("so the film cannot be cleared")

    # Each finding carries the evidence behind it: AUROC, its 95% CI, the films; chance level called out.
    evidence = demo_card["evidence"]
    for i in range(rows.count()):
        row = rows.nth(i)
        label = row.get_attribute("data-label")
        shown = row.get_by_test_id("finding-evidence")
        facts = evidence[label]
        if facts["auroc"] is not None:
            sync_api.expect(shown).to_contain_text(f"AUROC {facts['auroc']:.2f}")
        if facts["ci_low"] is not None and facts["ci_high"] is not None:
            sync_api.expect(shown).to_contain_text(f"95% CI {facts['ci_low']:.2f}–{facts['ci_high']:.2f}")
        sync_api.expect(shown).to_contain_text(f"{facts['n_films']} films")
        chance = row.get_by_test_id("not-better-than-chance")
        if facts["better_than_chance"] is False:
            sync_api.expect(chance).to_have_text("not better than chance")
        else:
            sync_api.expect(chance).to_have_count(0)
    screenshot(browser_page, "web-page-rule-marks.png")
    assert errors.unexpected() == []


def test_declared_age_and_view_go_with_the_upload(
    demo_page: tuple[Any, ConsoleErrors], demo_card: dict[str, Any]
) -> None:
    """The optional age and view are sent as patient_age and view; left empty, neither is sent."""
    browser_page, errors = demo_page
    radiograph = _need(NIH_PNG)
    _open(browser_page, demo_card)
    sync_api.expect(_by_testid(browser_page, "declared")).to_contain_text("never cleared")
    with browser_page.expect_request(lambda request: "/v1/predict" in request.url) as sent:
        _by_testid(browser_page, "file-input").set_input_files(str(radiograph))
    query = parse_qs(urlsplit(sent.value.url).query)
    assert "patient_age" not in query and "view" not in query, query
    _wait_for_results(browser_page)

    _by_testid(browser_page, "patient-age").fill("54")
    _by_testid(browser_page, "view").select_option("PA")
    with browser_page.expect_request(lambda request: "/v1/predict" in request.url) as sent:
        _by_testid(browser_page, "file-input").set_input_files(str(radiograph))
    query = parse_qs(urlsplit(sent.value.url).query)
    assert query["patient_age"] == ["54"] and query["view"] == ["PA"] and query["cams"] == ["auto"], query
    _wait_for_results(browser_page)
    assert errors.unexpected() == []


@pytest.mark.parametrize("demo_page", [LAPTOP, PHONE], indirect=True, ids=["laptop", "phone"])
def test_flagged_film_shows_no_findings(
    demo_page: tuple[Any, ConsoleErrors],
    demo_card: dict[str, Any],
    tmp_path: Path,
    screenshot: Callable[..., Path],
) -> None:
    """A photo trips the out-of-distribution gate: the page shows why and no probability, bar or heatmap; a
    radiograph after it shows findings again; a child's lateral DICOM is withheld for its population."""
    browser_page, errors = demo_page
    viewport = browser_page.viewport_size
    radiograph = _need(RADIOGRAPH_PNG)
    _open(browser_page, demo_card)
    results = _by_testid(browser_page, "results")

    def assert_withheld(because: str) -> None:
        message = _by_testid(browser_page, "withheld-message")
        sync_api.expect(message).to_be_visible()
        sync_api.expect(message).to_contain_text("No findings are shown because")
        sync_api.expect(message).to_contain_text(because)
        sync_api.expect(_by_testid(browser_page, "finding-row")).to_have_count(0)
        assert browser_page.locator("[data-testid=finding-bar]:visible").count() == 0
        sync_api.expect(_by_testid(browser_page, "findings-block")).to_be_hidden()
        sync_api.expect(_by_testid(browser_page, "cam-overlay")).to_be_hidden()
        sync_api.expect(_by_testid(browser_page, "cam-controls")).to_be_hidden()
        sync_api.expect(_by_testid(browser_page, "cam-scale")).to_be_hidden()
        sync_api.expect(_by_testid(browser_page, "cam-empty")).to_be_hidden()
        assert "%" not in results.inner_text(), results.inner_text()
        sync_api.expect(_by_testid(browser_page, "verdict")).to_be_in_viewport()

    answer = _upload(browser_page, _photo(tmp_path))
    assert answer["ood"]["in_distribution"] is False
    banner = _by_testid(browser_page, "ood-banner")
    sync_api.expect(banner).to_be_visible()
    sync_api.expect(banner).to_contain_text("This does not look like a frontal chest radiograph")
    sync_api.expect(_by_testid(browser_page, "ood-detail")).to_contain_text("above the model's threshold")
    sync_api.expect(_by_testid(browser_page, "refer-reasons")).to_contain_text("does not look like the radiographs")
    assert_withheld("does not look like the frontal chest radiographs")
    sync_api.expect(_by_testid(browser_page, "model-referral-summary")).to_contain_text("calibration films")
    screenshot(browser_page, f"web-page-ood-{viewport['width']}.png", full_page=False)

    _upload(browser_page, radiograph)
    sync_api.expect(banner).to_be_hidden()
    sync_api.expect(_by_testid(browser_page, "withheld-message")).to_be_hidden()
    sync_api.expect(_by_testid(browser_page, "finding-row")).to_have_count(len(demo_card["trained_labels"]))

    child = tmp_path / "child-lateral.dcm"
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.PatientAge, ds.ViewPosition = "005Y", "LL"
    ds.save_as(child)
    _upload(browser_page, child)
    sync_api.expect(_by_testid(browser_page, "population-banner")).to_be_visible()
    sync_api.expect(_by_testid(browser_page, "population-detail")).to_contain_text("a child, a lateral or oblique")
    assert_withheld("outside the model's intended use")
    _wait_for_film(browser_page)
    screenshot(browser_page, f"web-page-population-{viewport['width']}.png")
    assert errors.unexpected() == []
