"""The web page end to end: the real app on a loopback port, driven by Debian's Chromium through Playwright.

What a radiologist trying the model would notice: the model card's warning, the findings sorted by
probability with a decision chip each, the refer banner, the Grad-CAM overlay and its opacity, the
server-rendered preview of a DICOM the browser cannot show, and a plain-words error for a file that is
not an image. Screenshots land in ``tmp_path`` and, when ``CXR_TEST_ARTIFACTS`` is set, are copied there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
ORIGINALS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "originals"
RADIOGRAPH_PNG = ORIGINALS / "00000075_000.png"
RADIOGRAPH_DICOM = ORIGINALS / "siim-chest-cr-jpeg-baseline.dcm"
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
def _open_page(browser: Any, url: str) -> Iterator[tuple[Any, ConsoleErrors]]:
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=url)
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


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[[Any, str], Path]:
    """Save a full-page screenshot to tmp_path and, if CXR_TEST_ARTIFACTS is set, copy it there."""
    target = os.environ.get("CXR_TEST_ARTIFACTS")

    def save(page: Any, name: str) -> Path:
        path = tmp_path / name
        page.screenshot(path=str(path), full_page=True)
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


def test_png_upload_shows_sorted_findings_and_heatmap(
    page: tuple[Any, ConsoleErrors], model_card: dict[str, Any], screenshot: Callable[[Any, str], Path]
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
    page: tuple[Any, ConsoleErrors], model_card: dict[str, Any], screenshot: Callable[[Any, str], Path]
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
    page: tuple[Any, ConsoleErrors], model_card: dict[str, Any], screenshot: Callable[[Any, str], Path]
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


def test_untrained_placeholder_is_flagged(browser: Any, tmp_path: Path, screenshot: Callable[[Any, str], Path]) -> None:
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


def test_out_of_distribution_banner(browser: Any, tmp_path: Path, screenshot: Callable[[Any, str], Path]) -> None:
    """The shipped demo model's gate flags a photo: the page says so above the findings; a radiograph clears it."""
    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    if not (demo / "ood.safetensors").is_file():
        pytest.skip("models/demo has no OOD gate")
    from skimage.data import chelsea

    from train.ood import png_bytes

    photo = tmp_path / "cat.png"
    photo.write_bytes(png_bytes(chelsea()))
    radiograph = _need(RADIOGRAPH_PNG)
    with live_server(tiny_settings(demo)) as live, _open_page(browser, live.url) as (browser_page, errors):
        with live.client() as client:
            card = client.get("/v1/model").json()
        _open(browser_page, card)
        banner = _by_testid(browser_page, "ood-banner")
        _by_testid(browser_page, "file-input").set_input_files(str(photo))
        _wait_for_results(browser_page)
        sync_api.expect(banner).to_be_visible()
        sync_api.expect(banner).to_contain_text("This does not look like a frontal chest radiograph")
        sync_api.expect(_by_testid(browser_page, "ood-detail")).to_contain_text("above the model's threshold")
        chips = _by_testid(browser_page, "decision-chip")
        # A photo of a cat gets no decision chip that reads as a verdict (no red "Positive" under the warning).
        assert set(chips.evaluate_all("cs => cs.map(c => c.dataset.decision)")) == {"withheld"}
        sync_api.expect(chips.first).to_have_text("No decision")
        sync_api.expect(_by_testid(browser_page, "refer-reasons")).to_contain_text("does not look like the radiographs")
        sync_api.expect(_by_testid(browser_page, "model-referral-summary")).to_contain_text("calibration films")
        screenshot(browser_page, "web-page-ood.png")
        _by_testid(browser_page, "file-input").set_input_files(str(radiograph))
        sync_api.expect(banner).to_be_hidden()  # retried until the radiograph's result replaces the photo's
        sync_api.expect(chips.first).not_to_have_attribute("data-decision", "withheld")
        assert "withheld" not in chips.evaluate_all("cs => cs.map(c => c.dataset.decision)")
        child = tmp_path / "child-lateral.dcm"
        ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
        ds.PatientAge, ds.ViewPosition = "005Y", "LL"
        ds.save_as(child)
        _by_testid(browser_page, "file-input").set_input_files(str(child))
        population = _by_testid(browser_page, "population-banner")
        sync_api.expect(population).to_be_visible()
        sync_api.expect(chips.first).to_have_attribute("data-decision", "withheld")
        sync_api.expect(_by_testid(browser_page, "population-detail")).to_contain_text("a child, a lateral or oblique")
        assert set(chips.evaluate_all("cs => cs.map(c => c.dataset.decision)")) == {"withheld"}
        screenshot(browser_page, "web-page-population.png")
        assert errors.unexpected() == []
