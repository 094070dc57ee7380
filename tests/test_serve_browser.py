"""`cirfusion serve` in a real browser: Debian's Chromium (headless) driven by Selenium through chromium-driver.

The test starts the command on a small fused (DAFM) checkpoint and a folder of drawn images, uploads a reference,
types a modification, sees the results, picks a result with the keyboard (Tab to it, Enter) and sees it become the
reference with new results, and sees the explanation panel's Shapley table. Screenshots are saved to
``$CIRFUSION_ARTIFACTS/serve_browser`` (default ``tests/artifacts/serve_browser``, git-ignored).

It runs in the default suite; it skips, saying why, only when Chromium or its driver is not installed (``.ci/run``
installs both: ``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from cirfusion.backbones import create_backbone
from cirfusion.checkpoint import save_checkpoint
from cirfusion.methods import create_method
from cirfusion.methods.dafm import DAFM
from cirfusion.seeding import seed_everything

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="Chromium and chromium-driver are not installed (apt-get install chromium "
                                       "chromium-driver; .ci/run does)")
TIMEOUT = 60


def artefact_dir() -> Path:
    d = Path(os.environ.get("CIRFUSION_ARTIFACTS") or REPO / "tests" / "artifacts") / "serve_browser"
    d.mkdir(parents=True, exist_ok=True)
    return d


def draw(path: Path, rgb: tuple[int, int, int], xy: tuple[int, int], shape: str) -> Path:
    im = Image.new("RGB", (96, 96), (235, 235, 240))
    box = [xy[0], xy[1], xy[0] + 40, xy[1] + 40]
    (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_browser")
    gallery = root / "photos"
    colours = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 200, 40)}
    for name, rgb in colours.items():
        for shape in ("circle", "square"):
            for p, xy in enumerate([(8, 8), (48, 8), (28, 48)]):
                draw(gallery / shape / f"{name}_{p}.png", rgb, xy, shape)
    ref = draw(root / "my_photo.png", (200, 60, 50), (30, 30), "circle")
    bb = create_backbone("tiny")
    seed_everything(0)
    bases = [create_method("clip4cir", bb, embed_dim=16, hidden_dim=32), create_method("image-only", bb),
             create_method("tg-cir", bb)]
    ckpt = save_checkpoint(DAFM.from_bases(bases, score_dtype="float32"), root / "fused")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    env.pop("CIRFUSION_SERVE_TOKEN", None)
    log = open(root / "server.log", "w")  # closed in the finally below, after the server stops
    proc = subprocess.Popen([sys.executable, "-m", "cirfusion.cli", "serve", str(ckpt), "--images", str(gallery),
                             "--port", str(port), "--cache-dir", str(root / "cache"), "--no-progress", "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("cirfusion serve did not come up:\n" + (root / "server.log").read_text())
            time.sleep(0.3)
        yield {"url": url, "ref": ref, "log": root / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,1800", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=opts)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(cond, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as exc:  # a stale element while the page re-renders: try again
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def result_ids(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [b.get_attribute("data-id") for b in driver.find_elements(By.CSS_SELECTOR, "#results button.result")]


def test_upload_search_refine_and_explanation_in_chromium(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out = artefact_dir()
    d = browser
    d.get(server["url"] + "/")
    wait_for(lambda: "24 images" in d.find_element(By.ID, "info").text, "the catalog info line")
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#gallery button")) == 24, "the gallery grid")

    # 1. upload a reference and type the modification; Enter in the text field submits (keyboard use)
    d.find_element(By.ID, "upload").send_keys(str(server["ref"]))
    wait_for(lambda: "my_photo.png" in d.find_element(By.ID, "reference-label").text, "the uploaded reference")
    box = d.find_element(By.ID, "text")
    box.send_keys("same shape but green", Keys.ENTER)
    first = wait_for(lambda: len(result_ids(d)) == 12 and result_ids(d), "the first results")
    assert "results in" in d.find_element(By.ID, "status").text
    d.save_screenshot(str(out / "1-upload-results.png"))

    # 2. pick the third result with the keyboard: focus it, press Enter; it becomes the reference, results change
    pick = first[2]
    button = d.find_element(By.CSS_SELECTOR, f'#results button.result[data-id="{pick}"]')
    d.execute_script("arguments[0].focus();", button)
    assert d.switch_to.active_element == button
    button.send_keys(Keys.ENTER)
    wait_for(lambda: f"gallery image {pick}" == d.find_element(By.ID, "reference-label").text, "the new reference")
    second = wait_for(lambda: (ids := result_ids(d)) and ids != first and pick not in ids and ids,
                      "results of the refined query")
    assert len(second) == 12 and pick not in second  # the reference is not its own answer
    assert "is left out" in d.find_element(By.ID, "status").text
    d.save_screenshot(str(out / "2-refined-results.png"))

    # 3. the explanation panel: exact Shapley contributions per result, per base model
    table = d.find_element(By.ID, "shapley-table")
    heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert heads[:3] == ["result", "fused score", "baseline"] and heads[3:] == ["clip4cir", "image-only", "tg-cir"]
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 10 and rows[0].find_elements(By.TAG_NAME, "td")[0].text == second[0]
    assert "Shapley" in d.find_element(By.ID, "explanation-label").text
    assert "Gate weight" in d.find_element(By.ID, "explanation-body").text
    d.find_element(By.ID, "explanation").screenshot(str(out / "3-explanation.png"))

    # the history of turns: the upload, then the picked result
    turns = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#history li")]
    assert len(turns) == 2 and "my_photo.png" in turns[0] and pick in turns[1]
    for name in ("1-upload-results.png", "2-refined-results.png", "3-explanation.png"):
        with Image.open(io.BytesIO((out / name).read_bytes())) as im:
            assert im.size[0] > 100 and im.size[1] > 100
