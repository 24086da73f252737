"""The demo page (`flowers-ddpm demo`) on a tiny class-conditional pipeline with random weights.

Without a browser: a request draws exactly the grid `sample` writes (also with a guidance interval), its strip shows
x_t of the first image, a pipeline's saved guidance interval is the page's default and a blank field guides every
step, and input mistakes are one-sentence UserErrors. In a real browser (Debian's chromium and chromedriver through
Selenium, against the command serving on 127.0.0.1): the image the page shows, decoded by the browser, equals
`sample`'s PNG for the same seed and settings; wrong input (an unknown class, steps out of range, a reversed
guidance interval) is a message on the page and a later request still works.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from flowers_ddpm.cli import main
from flowers_ddpm.demo.app import build_demo, sampler_choices
from flowers_ddpm.demo.generation import OWN_SAMPLER, DemoModel, Request
from flowers_ddpm.errors import UserError
from flowers_ddpm.models.unet import build_edm_scheduler, build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline
from flowers_ddpm.publish.report import tensor_to_image

from .conftest import REPO

CLASSES = ["blue", "red"]


def export_tiny(path, guidance_interval=None):
    """A tiny class-conditional pipeline, the same random weights each time."""
    torch.manual_seed(0)
    return export_pipeline(build_unet("tiny", 16, num_classes=len(CLASSES)),
                           build_noise_scheduler(1000, "linear", "epsilon"), path, class_names=CLASSES,
                           guidance_interval=guidance_interval)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("demo") / "pipeline")


def sample_grid(pipeline_dir, out, *flags: str) -> np.ndarray:
    """The grid the `sample` command writes."""
    assert main(["sample", "--model", str(pipeline_dir), "--output", str(out), "--device", "cpu", *flags]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def test_a_request_draws_the_grid_sample_writes_and_the_first_images_steps(pipeline_dir, tmp_path):
    model = DemoModel(str(pipeline_dir), "cpu")
    assert model.class_names == CLASSES and model.conditional and model.classifier is None
    result = model.run(Request(num_images=5, seed=3, sampler="dpmsolver++", steps=4, classes=["red", "blue"],
                               guidance_scale=2.0))
    expected = sample_grid(pipeline_dir, tmp_path / "a.png", "--num_images", "5", "--seed", "3", "--scheduler",
                           "dpmsolver++", "--steps", "4", "--class_labels", "red", "blue", "--guidance_scale", "2")
    assert np.array_equal(np.asarray(result.grid), expected)
    assert result.summary.startswith("5 images, dpmsolver++ with 4 steps, seed 3: ") and result.seconds > 0

    # the strip: 4 steps give 5 states (noise, 3 x_t, the image), tiles enlarged x4 under a 14 px caption strip
    assert result.strip.size == (5 * 64, 64 + 14)
    strip = np.asarray(result.strip)

    def tile(i: int) -> np.ndarray:
        return strip[14:, i * 64:(i + 1) * 64]

    noise = torch.randn((1, 3, 16, 16), generator=torch.Generator("cpu").manual_seed(3))  # image 0's start
    assert np.array_equal(tile(0), np.asarray(tensor_to_image(noise).resize((64, 64), Image.NEAREST)))
    assert np.array_equal(tile(4), np.asarray(result.images[0].resize((64, 64), Image.NEAREST)))
    assert not np.array_equal(tile(1), tile(0)) and not np.array_equal(tile(3), tile(4))

    # the next request starts from the pipeline's own scheduler again (DDPM here; `sample`'s default is DDIM, so it
    # is named), as a fresh `sample` run does
    again = model.run(Request(num_images=2, seed=0, sampler=OWN_SAMPLER, steps=3))
    assert np.array_equal(np.asarray(again.grid), sample_grid(pipeline_dir, tmp_path / "b.png", "--num_images",
                                                              "2", "--steps", "3", "--scheduler", "ddpm"))
    assert "DDPMScheduler with 3 steps" in again.summary


def test_the_default_sampler_is_samples_default_for_the_models_family(pipeline_dir, tmp_path):
    model = DemoModel(str(pipeline_dir), "cpu")
    assert Request().sampler is None and model.default_sampler == "ddim"
    result = model.run(Request(num_images=2, seed=1, steps=3))
    assert result.summary.startswith("2 images, ddim with 3 steps")
    assert np.array_equal(np.asarray(result.grid), sample_grid(pipeline_dir, tmp_path / "a.png", "--num_images",
                                                               "2", "--seed", "1", "--steps", "3"))

    torch.manual_seed(0)  # an EDM-trained model: DDIM cannot sample it, so its own family's default is chosen
    edm_dir = export_pipeline(build_unet("tiny", 8), build_edm_scheduler(), tmp_path / "edm")
    edm = DemoModel(str(edm_dir), "cpu")
    assert edm.default_sampler == "edm-dpmsolver++"
    assert [value for _, value in sampler_choices(edm)] == [OWN_SAMPLER, "edm-dpmsolver++", "edm-sde-dpmsolver++",
                                                              "edm-euler"]
    result = edm.run(Request(num_images=2, seed=1, steps=3))
    assert result.summary.startswith("2 images, edm-dpmsolver++ with 3 steps")
    assert np.array_equal(np.asarray(result.grid), sample_grid(edm_dir, tmp_path / "b.png", "--num_images", "2",
                                                               "--seed", "1", "--steps", "3"))
    with pytest.raises(UserError, match="sampler must be one of edm-dpmsolver.., edm-sde-dpmsolver.., edm-euler; got 'ddim'"):
        edm.run(Request(sampler="ddim"))


# 4 DDIM steps of the linear schedule are at sigma 17.4, 3.44, 0.96 and 0.01: guidance at sigma <= 4.5 skips the first
GUIDED = {"num_images": 2, "seed": 3, "steps": 4, "classes": ["red", "blue"], "guidance_scale": 3.0}
GUIDED_FLAGS = ("--num_images", "2", "--seed", "3", "--steps", "4", "--class_labels", "red", "blue",
                "--guidance_scale", "3")


def test_a_request_with_a_guidance_interval_draws_the_grid_sample_writes(pipeline_dir, tmp_path):
    model = DemoModel(str(pipeline_dir), "cpu")
    assert model.default_guidance_interval is None
    result = model.run(Request(**GUIDED, guidance_interval="0 4.5"))
    expected = sample_grid(pipeline_dir, tmp_path / "a.png", *GUIDED_FLAGS, "--guidance_interval", "0", "4.5")
    assert np.array_equal(np.asarray(result.grid), expected)
    assert result.summary.startswith("2 images, ddim with 4 steps, seed 3, guidance 3 at sigma <= 4.5: ")


def test_the_saved_interval_is_the_default_and_a_blank_field_guides_every_step(pipeline_dir, tmp_path):
    saved_dir = export_tiny(tmp_path / "saved", guidance_interval=[0, 4.5])  # pipeline_dir's weights
    saved = DemoModel(str(saved_dir), "cpu")
    assert saved.default_guidance_interval == [0, 4.5]
    limited = saved.run(Request(**GUIDED))
    assert np.array_equal(np.asarray(limited.grid), sample_grid(saved_dir, tmp_path / "a.png", *GUIDED_FLAGS))
    assert ", guidance 3 at sigma <= 4.5: " in limited.summary

    every_step = np.asarray(DemoModel(str(pipeline_dir), "cpu").run(Request(**GUIDED)).grid)
    blank = saved.run(Request(**GUIDED, guidance_interval=""))
    assert np.array_equal(np.asarray(blank.grid), every_step)
    assert not np.array_equal(every_step, np.asarray(limited.grid))
    assert blank.summary.startswith("2 images, ddim with 4 steps, seed 3: ")
    # the command line says "every step" to such a pipeline as [0, inf]
    assert np.array_equal(sample_grid(saved_dir, tmp_path / "b.png", *GUIDED_FLAGS, "--guidance_interval", "0",
                                      "inf"), every_step)


def test_the_page_shows_the_saved_interval_for_class_conditional_models_only(pipeline_dir, tmp_path):
    pytest.importorskip("gradio")
    demo = build_demo(DemoModel(str(pipeline_dir), "cpu"))
    field = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "guidance_interval")
    assert field.value == "" and field.visible and "blank: every step" in field.label
    load = next(function for function in demo.fns.values() if function.name == "on_load")

    def field_after_loading(folder) -> dict:  # the Load model button's update of the field
        return dict(zip([output.elem_id for output in load.outputs], load.fn(str(folder))))["guidance_interval"]

    assert field_after_loading(export_tiny(tmp_path / "saved", guidance_interval=[0, 4.5])) == {
        "__type__": "update", "value": "0 4.5", "visible": True}
    torch.manual_seed(0)
    unconditional = export_pipeline(build_unet("tiny", 8), build_noise_scheduler(1000, "linear", "epsilon"),
                                    tmp_path / "unconditional")
    assert field_after_loading(unconditional)["visible"] is False


@pytest.mark.parametrize("request_, message", [
    (Request(classes=["tulip"]), "unknown class 'tulip'; classes are blue, red"),
    (Request(steps=0), "0 sampling steps: this sampler takes 1 to 1000 steps"),
    (Request(sampler="dpmsolver++", steps=1000), "this sampler takes 1 to 999 steps"),
    (Request(num_images=17), "number of images must be 1 to 16; got 17"),
    (Request(seed=1.5), "seed must be a whole number; got 1.5"),
    (Request(steps=None), "steps must be a whole number; got None"),
    (Request(sampler="euler"), "sampler must be one of ddpm, ddim, dpmsolver++, sde-dpmsolver++; got 'euler'"),
    (Request(guidance_interval="abc"), "guidance interval takes two noise levels 0 <= LO < HI; got abc"),
    (Request(guidance_interval="4.5"), "guidance interval takes two noise levels 0 <= LO < HI; got 4.5"),
    (Request(guidance_interval="5 2"), "guidance interval takes two noise levels 0 <= LO < HI; got 5 2"),
    (Request(guidance_interval=(-1, 2)), "guidance interval takes two noise levels 0 <= LO < HI; got -1 2"),
])
def test_input_mistakes_are_one_sentence_user_errors(pipeline_dir, request_, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DemoModel(str(pipeline_dir), "cpu").run(request_)


def test_a_folder_that_is_not_a_pipeline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a diffusers pipeline folder"):
        DemoModel(str(tmp_path), "cpu")


def test_without_gradio_the_command_says_how_to_install_it_and_exits_2(pipeline_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    assert main(["demo", "--model", str(pipeline_dir)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [('error: the demo needs gradio, which is not installed: pip install -e '
                                         '".[demo]" (or pip install gradio)')]


# --- in a real browser ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pipeline_dir, tmp_path_factory):
    """`flowers-ddpm demo` in its own process on 127.0.0.1; its URL."""
    pytest.importorskip("gradio")
    port, log_path = _free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "GRADIO_TEMP_DIR": str(log_path.parent / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "flowers_ddpm.cli", "demo", "--model", str(pipeline_dir),
                                    "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=REPO)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, f"the demo exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the demo did not serve:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by its chromedriver (no download of drivers or browsers)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if os.environ.get("FLOWERS_DDPM_REQUIRE_BROWSER"):  # .ci/run installs them: a missing one is a failure there
        import selenium  # noqa: F401

        assert chromium and chromedriver, "apt-get install chromium chromium-driver"
    else:
        pytest.importorskip("selenium")
        if not (chromium and chromedriver):
            pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="demo-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The demo page in the browser, found by the elem_ids app.py gives its components."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by, self.keys = driver, By, Keys
        self.wait = WebDriverWait(driver, 120)
        driver.get(url)
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def type_number(self, elem_id: str, value: int) -> None:
        field = self.find(f"#{elem_id} input")
        field.send_keys(self.keys.CONTROL, "a")
        field.send_keys(str(value))

    def type_text(self, elem_id: str, text: str) -> None:
        field = self.find(f"#{elem_id} textarea, #{elem_id} input")
        field.send_keys(self.keys.CONTROL, "a")
        field.send_keys(self.keys.BACKSPACE, text)

    def add_class(self, name: str) -> None:
        field = self.find("#classes input")
        field.send_keys(name)
        field.send_keys(self.keys.ENTER)
        self.wait.until(lambda d: name in self.chosen_classes())

    def chosen_classes(self) -> list[str]:
        return [token.text for token in self.driver.find_elements(self.by.CSS_SELECTOR, "#classes .token span")]

    def status(self) -> str:
        return self.find("#status textarea").get_attribute("value")

    def generate(self) -> str:
        """Press Generate and wait for the status line to change; returns it."""
        before = self.status()
        self.find("#generate").click()
        self.wait.until(lambda d: self.status() and self.status() != before)
        return self.status()

    def shown_grid(self) -> np.ndarray:
        """The grid image as the browser decoded it (drawn on a canvas, read back as PNG)."""
        img = self.wait.until(lambda d: d.find_elements(self.by.CSS_SELECTOR, "#grid img"))[0]
        self.wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
        data_url = self.driver.execute_script(
            "const img = arguments[0], canvas = document.createElement('canvas');"
            "canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;"
            "canvas.getContext('2d').drawImage(img, 0, 0); return canvas.toDataURL('image/png');", img)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


@pytest.mark.slow
def test_the_page_shows_the_images_sample_writes(server, browser, pipeline_dir, tmp_path):
    page = Page(browser, server)
    page.type_number("seed", 7)
    page.type_number("steps", 3)
    page.add_class("red")
    status = page.generate()
    assert status.startswith("4 images, ddim with 3 steps, seed 7: ") and status.endswith(" s on cpu"), status
    shown = page.shown_grid()
    expected = sample_grid(pipeline_dir, tmp_path / "cli.png", "--num_images", "4", "--seed", "7", "--steps", "3",
                           "--scheduler", "ddim", "--class_labels", "red")
    assert shown.shape == expected.shape == (32, 32, 3)
    assert np.array_equal(shown, expected)
    assert page.find("#strip img").get_attribute("src")  # the denoising strip is shown too
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert Image.open(tmp_path / "demo.png").size[0] >= 1000


@pytest.mark.slow
def test_wrong_input_is_a_message_on_the_page_and_the_server_keeps_serving(server, browser, pipeline_dir, tmp_path):
    page = Page(browser, server)
    model = page.find("#model textarea, #model input")
    model.send_keys(page.keys.CONTROL, "a")
    model.send_keys(str(tmp_path))
    before = page.status()
    page.find("#load").click()
    page.wait.until(lambda d: page.status() != before)
    assert page.status() == (f"error: {tmp_path} is not a diffusers pipeline folder (no model_index.json) (still "
                             f"serving {pipeline_dir})")

    page.add_class("tulip")
    assert page.generate() == "error: unknown class 'tulip'; classes are blue, red"
    assert "Traceback" not in browser.page_source
    assert not browser.find_elements(page.by.CSS_SELECTOR, "#grid img")

    page.find('#classes [title="Remove tulip"]').click()
    page.add_class("blue")
    page.type_number("steps", 0)
    assert page.generate() == ("error: 0 sampling steps: this sampler takes 1 to 1000 steps for a model trained "
                               "with 1000 timesteps")

    page.type_number("steps", 2)
    page.type_text("guidance_interval", "5 2")
    assert page.generate() == "error: guidance interval takes two noise levels 0 <= LO < HI; got 5 2"

    page.type_text("guidance_interval", "0 4.5")
    assert page.generate().startswith("4 images, ddim with 2 steps, seed 0, guidance 1.5 at sigma <= 4.5: ")
    assert page.shown_grid().shape == (32, 32, 3)
