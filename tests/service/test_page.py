"""The page at / in a real browser (Debian's chromium through selenium): real PNG files uploaded
through the page, their labels and the points drawn on the map checked against the server."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MODEL, ROOT, Served, debian_tool, png

SCREENSHOTS = Path(os.environ.get("CNN_SERVING_SCREENSHOTS", ROOT / "build" / "screenshots"))


@pytest.fixture
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = debian_tool("chromium", "chromium", "browser")
    driver_path = debian_tool("chromedriver", "chromium-driver", "browser")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1100"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def get_json(served: Served, path: str) -> dict:
    with urllib.request.urlopen(f"http://{served.http}{path}", timeout=30) as response:
        return json.loads(response.read())


def test_the_page_classifies_uploaded_files_and_draws_them_on_the_map(
    server: Served, browser, sample_images, tmp_path: Path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    x, _ = sample_images
    files = []
    for i in range(5):
        path = tmp_path / f"item-{i}.png"
        path.write_bytes(png(x[i]))
        files.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    files.append(broken)
    expected = {
        r["id"]: r.get("label") for r in _classify(server, files)["results"]
    }  # what the API answers for the same files

    wait = WebDriverWait(browser, 30)
    browser.get(f"http://{server.http}/")
    points_on_disk = get_json(server, f"/v1/models/{MODEL}/map")["points"]["x"]
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "circle.map-point")) > 0)
    assert len(browser.find_elements(By.CSS_SELECTOR, "circle.map-point")) == len(points_on_disk)
    assert browser.find_element(By.ID, "model").get_attribute("value") == MODEL

    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.result")) == len(files))
    cards = browser.find_elements(By.CSS_SELECTOR, "article.result")
    shown = {}
    for card in cards:
        name = card.find_element(By.CSS_SELECTOR, ".name").text.split(". ", 1)[1]
        shown[name] = card.get_attribute("data-label")
    assert shown == expected  # the same labels as the API, the broken file without one
    failed = [c for c in cards if "failed" in c.get_attribute("class")]
    assert len(failed) == 1 and "INVALID_ARGUMENT" in failed[0].text
    # one star per classified image, on top of the map's points
    assert len(browser.find_elements(By.CSS_SELECTOR, ".image-point")) == len(files) - 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "circle.map-point")) == len(points_on_disk)
    assert "5 classified, 1 could not be" in browser.find_element(By.ID, "status").text
    assert browser.get_log("browser") == []  # no script error, no failed load
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "page.png"))


def _classify(served: Served, files: list[Path]) -> dict:
    """The same files through /v1 classify as a multipart form (what the page sends)."""
    boundary = "pagetest"
    body = b""
    for path in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{path.name}"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + path.read_bytes()
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"http://{served.http}/v1/models/{MODEL}:classify",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_page_says_when_a_version_has_no_map(private_repo: Path, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import start_server

    version = private_repo / MODEL / "1"
    (version / "bottleneck_map.json").unlink()
    metadata = json.loads((version / "metadata.json").read_text())
    del metadata["bottleneck_map"]
    (version / "metadata.json").write_text(json.dumps(metadata))
    served = start_server(private_repo)
    try:
        browser.get(f"http://{served.http}/")
        note = browser.find_element(By.ID, "map-note")
        WebDriverWait(browser, 30).until(lambda d: "no bottleneck map" in note.text)
        assert "exported before bottleneck maps existed" in note.text
        assert browser.find_elements(By.CSS_SELECTOR, "circle.map-point") == []
    finally:
        assert served.stop() == 0
