"""The playground of ``sims serve`` in a real browser: headless Chromium driven by Selenium
against ``sims serve`` subprocesses on loopback, with the tiny model and two steerings.

Chromium and ChromeDriver are Debian's (``apt-get install chromium chromium-driver``;
.ci/run installs them). Without them these tests fail rather than skip, so that CI cannot
pass without running them. Every wait is for a DOM condition, never a fixed sleep.

Set ``SIMSTEER_PLAYGROUND_SCREENSHOT=docs/images/playground.png`` to keep the screenshot of
the first test (docs/playground.md shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from simsteer.learners.caa import AddVector
from simsteer.models import load_model
from simsteer.policy import Policy
from simsteer.steering import Steering

KEY = "playground-key-123"
#: Generous: CI is a loaded 2-core machine; a wait ends as soon as its condition holds.
WAIT_S = 120
#: The server's limits (the error test goes over both).
MAX_TOKENS_LIMIT = 12
MAX_REQUEST_BYTES = 4000
#: Where the tiny model's steered and unsteered greedy answers differ (checked in test_serve).
PROMPT = "the good day"


def _browser_paths() -> tuple[str, str]:
    """Debian's chromium binary and chromedriver; fail (not skip) when they are missing."""
    driver = shutil.which("chromedriver")
    browser = next(
        (p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and Path(p).exists()),
        None,
    )
    if not (driver and browser):
        pytest.fail("the playground test needs Chromium: apt-get install -y chromium chromium-driver")
    return browser, driver


@dataclass
class Server:
    """A running ``sims serve`` subprocess."""

    url: str
    log: Path
    proc: subprocess.Popen

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log.read_text(encoding="utf-8").splitlines() if needle in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def steering_dirs(tiny_model_dir, tmp_path_factory) -> list[str]:
    """Two tiny steerings: a large constant push and a seeded random one."""
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    root = tmp_path_factory.mktemp("playground-steerings")
    big = Steering({1: AddVector(torch.full((lm.hidden_size,), 50.0))}, "caa", lm.fingerprint())
    gen = torch.Generator().manual_seed(0)
    calm = Steering({2: AddVector(30 * torch.randn(lm.hidden_size, generator=gen))}, "caa", lm.fingerprint())
    Policy(big).save(root / "big")
    Policy(calm).save(root / "calm")
    return [f"big={root / 'big'}", f"calm={root / 'calm'}"]


def _start_server(model_dir: Path, steerings: list[str], folder: Path, key: str | None) -> Server:
    port = _free_port()
    log = folder / "serve.log"
    args = [sys.executable, "-m", "simsteer", "serve", "--model", str(model_dir)]
    args += ["--device", "cpu", "--dtype", "fp32", "--port", str(port)]
    args += ["--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    for spec in steerings:
        args += ["--steering", spec]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if key:
        args += ["--api-key-env", "PLAYGROUND_TEST_KEY"]
        env["PLAYGROUND_TEST_KEY"] = key
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(WAIT_S * 5):
        if proc.poll() is not None:
            pytest.fail(f"sims serve exited: {log.read_text()[-2000:]}")
        # A keyed server keys /health too: the key is sent where there is one.
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{url}/health", headers=headers), timeout=1
            ) as reply:
                if reply.status == 200:
                    return Server(url, log, proc)
        except OSError:
            proc_wait(proc, 0.2)
    proc.terminate()
    pytest.fail(f"sims serve did not come up: {log.read_text()[-2000:]}")


def proc_wait(proc: subprocess.Popen, seconds: float) -> None:
    """Wait for the server to start (or to die), at most ``seconds``."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def open_server(tiny_model_dir, steering_dirs, tmp_path_factory) -> Iterator[Server]:
    server = _start_server(tiny_model_dir, steering_dirs, tmp_path_factory.mktemp("open-server"), None)
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, steering_dirs, tmp_path_factory) -> Iterator[Server]:
    server = _start_server(tiny_model_dir, steering_dirs, tmp_path_factory.mktemp("keyed-server"), KEY)
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail('the playground test needs Selenium: pip install -e ".[dev]"')
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,700")
    options.add_argument("--force-color-profile=srgb")
    options.add_argument("--hide-scrollbars")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers -------------------------------------------------------------------------------------


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message)


def _by_id(driver, ident: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, ident)


def _open(driver, server: Server) -> None:
    driver.get(f"{server.url}/playground")
    _wait(driver, lambda d: d.execute_script("return document.readyState") == "complete", "page load")


def _connected(driver) -> None:
    _wait(driver, lambda d: _by_id(d, "run").is_enabled(), "the Generate button to be enabled")


def _set(driver, ident: str, value: str) -> None:
    field = _by_id(driver, ident)
    field.clear()
    field.send_keys(value)


def _column(driver, key: str) -> dict:
    """What a column shows: its state, text, footer and the steering the server reported."""
    return driver.execute_script(
        """
        const el = document.getElementById('col-' + arguments[0]);
        if (!el) return null;
        return {state: el.dataset.state || '', text: el.querySelector('.text').textContent,
                footer: el.querySelector('.state').textContent,
                steering: el.dataset.steering || null, strength: el.dataset.strength || null};
        """,
        key,
    )


def _finished(driver, key: str, state: str = "done", strength: str | None = None) -> dict:
    def ready(d):
        col = _column(d, key)
        if not col or col["state"] != state:
            return False
        return strength is None or col["strength"] == strength

    _wait(driver, ready, f"column {key} to be {state} (strength {strength})")
    return _column(driver, key)


def _curl_text(driver) -> str:
    return driver.execute_script("return document.getElementById('curl').textContent")


def _run_curl(driver, env: dict[str, str] | None = None) -> dict:
    """Run the page's curl command (as a user would paste it into a shell); its JSON reply."""
    if not shutil.which("curl"):
        pytest.fail("the playground test runs the page's curl command: apt-get install -y curl")
    command = _curl_text(driver)
    assert command.startswith("curl http://127.0.0.1:")
    done = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _greedy_settings(driver) -> None:
    _set(driver, "prompt", PROMPT)
    _set(driver, "temperature", "0")
    _set(driver, "max-tokens", "8")


# -- the tests -----------------------------------------------------------------------------------


def test_page_compares_unsteered_and_steered_and_the_slider_sets_the_strength(browser, open_server, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open(browser, open_server)
    _connected(browser)
    assert _by_id(browser, "key-panel").is_displayed() is False  # a keyless server asks for no key
    picker = Select(_by_id(browser, "steering"))
    assert [o.get_attribute("value") for o in picker.options] == ["big", "calm"]
    assert "2 steerings" in _by_id(browser, "server-status").text
    assert not _by_id(browser, "sweep-field").is_displayed()  # the sweep's strengths: sweep view only

    _greedy_settings(browser)
    _by_id(browser, "run").click()
    plain = _finished(browser, "unsteered")
    steered = _finished(browser, "steered")
    assert plain["text"].strip() and steered["text"].strip()
    assert (plain["steering"], steered["steering"], steered["strength"]) == ("none", "big", "1")
    assert steered["text"] != plain["text"]  # greedy: only the steering differs
    assert "server: big \u00d7 1" in steered["footer"]
    assert open_server.log_lines("steering big, strength 1,")
    assert open_server.log_lines("steering none,")
    reply = _run_curl(browser)  # the page's "Use via API" command gives the same answer
    assert (reply["steering"], reply["strength"]) == ("big", 1)
    assert reply["choices"][0]["message"]["content"] == steered["text"]
    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    _keep_screenshot(shot)

    # Move the slider from 1 to 0 with the keyboard (step 0.05): the steered column is
    # regenerated at strength 0, which is the unsteered model: the same greedy text.
    slider = _by_id(browser, "strength")
    slider.send_keys(*([Keys.ARROW_LEFT] * 20))
    _wait(browser, lambda d: _by_id(d, "strength-value").text == "0.00", "the slider to read 0.00")
    zero = _finished(browser, "steered", strength="0")
    assert zero["steering"] == "big"
    assert zero["text"] == plain["text"]
    assert open_server.log_lines("steering big, strength 0,")  # the request the server received
    assert _column(browser, "unsteered")["text"] == plain["text"]  # left alone

    # The picker chooses the steering of the request.
    picker.select_by_value("calm")
    slider.send_keys(*([Keys.ARROW_RIGHT] * 30))  # 0 -> 1.5
    calm = _finished(browser, "steered", strength="1.5")
    assert calm["steering"] == "calm"
    assert open_server.log_lines("steering calm, strength 1.5,")


def test_strength_sweep_fills_one_column_per_strength(browser, open_server):
    from selenium.webdriver.common.by import By

    _open(browser, open_server)
    _connected(browser)
    _greedy_settings(browser)
    browser.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="sweep"]').click()
    assert _by_id(browser, "sweep-field").is_displayed()
    _set(browser, "sweep", "0, 0.5, 2")
    _by_id(browser, "run").click()
    columns = [_finished(browser, f"sweep-{i}") for i in range(3)]
    assert [c["strength"] for c in columns] == ["0", "0.5", "2"]
    assert all(c["steering"] == "big" and c["text"].strip() for c in columns)
    assert columns[0]["text"] != columns[2]["text"]
    assert _column(browser, "sweep-3") is None
    _set(browser, "sweep", "1, 2")
    _by_id(browser, "run").click()
    _wait(browser, lambda d: _by_id(d, "form-error").is_displayed(), "the sweep's form error")
    assert "3 to 5 strengths" in _by_id(browser, "form-error").text


def test_server_errors_are_shown_as_the_server_sent_them(browser, open_server):
    _open(browser, open_server)
    _connected(browser)
    _greedy_settings(browser)
    _set(browser, "max-tokens", "100")
    _by_id(browser, "run").click()
    for key in ("unsteered", "steered"):
        col = _finished(browser, key, state="error")
        assert col["footer"] == f"400 max_tokens 100 is over this server's limit {MAX_TOKENS_LIMIT}"
    _set(browser, "max-tokens", "4")
    browser.execute_script("document.getElementById('prompt').value = 'the day '.repeat(800)")
    _by_id(browser, "run").click()
    col = _finished(browser, "steered", state="error")
    assert col["footer"] == f"413 request body over {MAX_REQUEST_BYTES} bytes"


def test_keyed_server_asks_for_the_key_and_rejects_a_wrong_one(browser, keyed_server):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open(browser, keyed_server)  # the page itself needs no key
    _wait(browser, lambda d: _by_id(d, "key-panel").is_displayed(), "the API-key field")
    assert "needs an API key" in _by_id(browser, "server-status").text
    assert not _by_id(browser, "run").is_enabled()

    _set(browser, "api-key", "wrong-key")
    _by_id(browser, "api-key").send_keys(Keys.ENTER)
    error = _by_id(browser, "key-error")
    _wait(browser, lambda d: error.is_displayed(), "the 401 on the page")
    assert error.text == "401 invalid or missing API key"
    assert not _by_id(browser, "run").is_enabled()

    _set(browser, "api-key", KEY)
    _by_id(browser, "api-key").send_keys(Keys.ENTER)
    _connected(browser)
    assert not error.is_displayed()
    options = Select(_by_id(browser, "steering")).options
    assert [o.get_attribute("value") for o in options] == ["big", "calm"]
    _greedy_settings(browser)
    _by_id(browser, "run").click()
    assert _finished(browser, "steered")["strength"] == "1"  # the key went with the API calls
    assert _finished(browser, "unsteered")["text"].strip()
    assert "Bearer $SIMS_API_KEY" in _curl_text(browser)  # the key itself is not shown
    assert _run_curl(browser, {"SIMS_API_KEY": KEY})["steering"] == "big"


def _keep_screenshot(shot: Path) -> None:
    """Copy the screenshot to $SIMSTEER_PLAYGROUND_SCREENSHOT, made small (a 64-colour PNG)."""
    target = os.environ.get("SIMSTEER_PLAYGROUND_SCREENSHOT")
    if not target:
        return
    from PIL import Image

    with Image.open(shot) as image:
        image.convert("RGB").quantize(colors=64).save(target, optimize=True)
