"""llama-server's web UI at `/`: served as server-http.cpp serves it, and used in a real browser.

Over the app (a small stand-in bundle, so these run on any build): the routes, upstream's
headers (gzip, ETag/304, 415 without gzip, caching, cross-origin isolation on the page), --no-ui
and --path, /props' `ui`, the page public under --api-key and served while the model loads.

In a browser (the bundle vendor/fetch.py --ui built, Debian's headless Chromium driven by
selenium, the default model): the page loads without console errors, a message typed is sent
and the reply streams into the page, a second turn works, the settings show the server's
props and --ui-config; with --api-key the page asks for the key and works once it is entered.
A screenshot of the conversation is saved under the folder the test prints
(PYLLAMA_TEST_ARTIFACTS, default <tmp>/pyllama-test-artifacts). Without Chromium (or a built UI)
these skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from pyllama.server import ui

from .conftest import ServerProcess
from .fake_engine import fake_app

IN_CI = os.environ.get("CI") == "true"
UI_CONFIG = {"systemMessage": "You are a helpful assistant from pyllama's browser test."}


# --- over the app, with a stand-in bundle ------------------------------------------------------

def _write_bundle(folder: Path, files: dict) -> None:
    assets = []
    for name, (ctype, data) in files.items():
        packed = gzip.compress(data, mtime=0)
        (folder / (name + ".gz")).parent.mkdir(parents=True, exist_ok=True)
        (folder / (name + ".gz")).write_bytes(packed)
        assets.append({"name": name, "type": ctype, "etag": '"' + hashlib.sha256(packed).hexdigest() + '"',
                       "size": len(data), "gzip_size": len(packed)})
    (folder / ui.MANIFEST).write_text(json.dumps({"assets": assets}))


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A small bundle in place of the installed one (whether or not this build has one)."""
    _write_bundle(tmp_path, {
        "index.html": ("text/html; charset=utf-8", b"<!doctype html><title>llama-ui</title>"),
        "sw.js": ("application/javascript", b"self.addEventListener('install', () => {});"),
        "_app/version.json": ("application/json", b'{"version":"1"}'),
        "_app/immutable/bundle.AbC123.js": ("application/javascript", b"console.log(1);"),
        "favicon.svg": ("image/svg+xml", b"<svg/>"),
    })
    monkeypatch.setattr(ui, "_bundle", ui.Bundle.load(tmp_path))
    monkeypatch.setattr(ui, "_loaded", True)
    return tmp_path


GZ = {"Accept-Encoding": "gzip, deflate, br"}


def test_routes_and_headers_as_upstream(stand_in, synthetic_path):
    client, _ = fake_app(synthetic_path)
    for path in ("/", "/index.html"):
        r = client.simulate_get(path, headers=GZ)
        assert r.status_code == 200 and gzip.decompress(r.content).startswith(b"<!doctype html>")
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["cross-origin-embedder-policy"] == "require-corp"
        assert r.headers["cross-origin-opener-policy"] == "same-origin"
        tag = r.headers["etag"]
        assert client.simulate_get(path, headers={**GZ, "If-None-Match": tag}).status_code == 304
        assert client.simulate_get(path, headers={**GZ, "If-None-Match": "W/" + tag}).status_code == 304
    r = client.simulate_get("/_app/immutable/bundle.AbC123.js", headers=GZ)
    assert r.status_code == 200 and gzip.decompress(r.content) == b"console.log(1);"
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["content-type"] == "application/javascript" and "etag" in r.headers
    assert "cross-origin-embedder-policy" not in r.headers
    for name in ("sw.js", "_app/version.json"):  # PWA revalidation files: no-cache, no ETag
        r = client.simulate_get("/" + name, headers=GZ)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache" and "etag" not in r.headers
    assert b"install" in gzip.decompress(client.simulate_get("/sw.js", headers=GZ).content)  # the UI's own
    assert client.simulate_get("/favicon.svg", headers=GZ).headers["content-type"] == "image/svg+xml"
    r = client.simulate_get("/", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 415 and r.text == "Error: gzip is not supported by this browser"
    assert client.simulate_head("/", headers=GZ).status_code == 200
    assert client.simulate_get("/missing.js", headers=GZ).json["error"]["message"] == "File Not Found"
    assert client.simulate_get("/props").json["ui"] is True


def test_ui_off_path_prefix_and_ui_config(stand_in, synthetic_path, tmp_path):
    client, _ = fake_app(synthetic_path, args=["--no-ui"])
    assert client.simulate_get("/", headers=GZ).status_code == 404
    assert client.simulate_get("/props").json["ui"] is False
    sw = client.simulate_get("/sw.js")  # upstream's self-removing worker
    assert sw.status_code == 200 and "unregister" in sw.text
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("mine\n")
    client, _ = fake_app(synthetic_path, args=["--path", str(site)])  # a folder instead of the UI
    assert client.simulate_get("/").text == "mine\n"
    assert client.simulate_get("/favicon.svg", headers=GZ).status_code == 404
    assert "unregister" in client.simulate_get("/sw.js").text
    assert client.simulate_get("/props").json["ui"] is True  # params.ui, as upstream
    client, _ = fake_app(synthetic_path, args=["--api-prefix", "/llm", "--ui-config", json.dumps(UI_CONFIG)])
    assert gzip.decompress(client.simulate_get("/llm/", headers=GZ).content).startswith(b"<!doctype")
    assert client.simulate_get("/llm/_app/version.json", headers=GZ).status_code == 200
    assert client.simulate_get("/", headers=GZ).status_code == 404
    assert client.simulate_get("/llm/props").json["ui_settings"] == UI_CONFIG
    cfg = tmp_path / "ui.json"
    cfg.write_text(json.dumps(UI_CONFIG))
    client, _ = fake_app(synthetic_path, args=["--webui-config-file", str(cfg)])
    assert client.simulate_get("/props").json["ui_settings"] == UI_CONFIG


def test_page_public_under_api_key_and_while_loading(stand_in, synthetic_path):
    client, _ = fake_app(synthetic_path, args=["--api-key", "k"])
    for path in ("/", "/index.html", "/_app/immutable/bundle.AbC123.js", "/sw.js", "/favicon.svg"):
        assert client.simulate_get(path, headers=GZ).status_code == 200, path
    assert client.simulate_get("/props").status_code == 401
    assert client.simulate_get("/props", headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.simulate_get("/favicon.ico", headers=GZ).status_code == 401  # not a UI file
    import falcon.testing

    from pyllama.cli import parse_server_args
    from pyllama.server.app import ServerState, create_app

    state = ServerState(parse_server_args(["-m", str(synthetic_path)], environ={}), str(synthetic_path))
    loading = falcon.testing.TestClient(create_app(state))  # no model yet: upstream's "loading"
    assert loading.simulate_get("/", headers=GZ).status_code == 200
    assert loading.simulate_get("/sw.js", headers=GZ).status_code == 200
    assert loading.simulate_get("/props").status_code == 503


def test_no_bundle_serves_the_api_and_says_how_to_build(synthetic_path, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(ui, "_bundle", ui.Bundle.load(tmp_path))  # an empty folder: no UI
    monkeypatch.setattr(ui, "_loaded", True)
    with caplog.at_level("WARNING", logger="pyllama.server.ui"):
        client, _ = fake_app(synthetic_path)
    assert [r.message for r in caplog.records if "vendor/fetch.py --ui" in r.message]
    assert client.simulate_get("/", headers=GZ).status_code == 404
    assert client.simulate_get("/health").status_code == 200
    assert client.simulate_get("/props").json["ui"] is True  # params.ui, as upstream's build without assets


def test_installed_bundle_is_complete():
    """The bundle of this install, when it has one: upstream's required files, gzip, licences."""
    bundle = ui.bundle()
    if bundle is None:
        if IN_CI:
            pytest.fail("this pyllama has no web UI (CI builds it: python vendor/fetch.py --ui-required)")
        pytest.skip("the web UI is not built here (python vendor/fetch.py --ui)")
    names = set(bundle.assets)
    assert {"index.html", "sw.js", "manifest.webmanifest", "build.json", "_app/version.json"} <= names
    assert any(n.startswith("_app/immutable/bundle.") and n.endswith(".js") for n in names)
    for asset in bundle.assets.values():
        assert asset.etag == '"' + hashlib.sha256(asset.data).hexdigest() + '"'
    assert b"<html" in gzip.decompress(bundle.assets["index.html"].data)
    licences = (bundle.folder / "THIRD_PARTY_LICENSES.txt").read_text()
    assert "llama.cpp (tools/ui)  MIT" in licences and "svelte@" in licences
    m = bundle.manifest
    assert m["gzip_bytes"] == sum(len(a.data) for a in bundle.assets.values())


# --- in a real browser -------------------------------------------------------------------------

def _need(ok, why: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(why + " (CI=true: the browser test must run)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser_env():
    try:
        import selenium  # noqa: F401
    except ImportError:
        _need(False, "selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    _need(chromium and driver, "Chromium is not installed (apt-get install chromium chromium-driver)")
    _need(ui.bundle() is not None, "the web UI is not built here (python vendor/fetch.py --ui)")
    folder = Path(os.environ.get("PYLLAMA_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "pyllama-test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return chromium, driver, folder


@pytest.fixture
def browser(browser_env):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver, _ = browser_env
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,960",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _serve(gemma_path, *extra) -> ServerProcess:
    # -n 24: short replies (the UI sends no max_tokens by default); --temp/--top-k: props the
    # settings must show
    srv = ServerProcess(["-m", str(gemma_path), "-np", "2", "-c", "4096", "-n", "24", "--temp", "0.42",
                         "--top-k", "17", "--ui-config", json.dumps(UI_CONFIG), *extra])
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def ui_server(browser_env, gemma_path):
    srv = _serve(gemma_path)
    yield srv
    srv.stop()


def _wait(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _severe(d, allowed=()) -> list:
    """The page's console errors (network ones too), less those upstream's server gives as well."""
    out = []
    for entry in d.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        if any(a in entry["message"] for a in allowed):
            continue
        out.append(entry)
    return out


# Without --tools upstream answers GET /tools 403 and the page notes "Server tools are disabled".
TOOLS_OFF = "/tools - Failed to load resource: the server responded with a status of 403"


# read in one script: the page re-renders while it streams, so element handles go stale
ASSISTANT_TEXTS = """return [...document.querySelectorAll("[aria-label='Assistant message with actions']")]
    .map(e => e.innerText)"""
GENERATING = """return [...document.querySelectorAll('button')].some(b => b.offsetParent !== null &&
    (b.innerText.trim() === 'Stop' || b.getAttribute('aria-label') === 'Stop'))"""


def _assistant_texts(d) -> list[str]:
    return d.execute_script(ASSISTANT_TEXTS)


def _generating(d) -> bool:
    return d.execute_script(GENERATING)


def _send(d, text: str, turn: int, timeout: float = 240) -> list[str]:
    """Type a message, send it, watch the reply of turn `turn` grow; return its successive texts."""
    from selenium.webdriver.common.by import By

    box = _wait(lambda: [e for e in d.find_elements(By.CSS_SELECTOR, "textarea") if e.is_displayed()], 60,
                "the message box")[0]
    box.send_keys(text)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = _assistant_texts(d)
        if len(texts) >= turn and texts[turn - 1].strip():
            if not seen or seen[-1] != texts[turn - 1]:
                seen.append(texts[turn - 1])
            if not _generating(d):
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no finished reply to {text!r} within {timeout:.0f} s; seen {seen[-1:]}")
    return seen


def _click_text(d, text: str) -> None:
    from selenium.webdriver.common.by import By

    found = _wait(lambda: [e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']")
                           if e.is_displayed()], 30, repr(text))
    found[0].click()


def test_chat_in_chromium(browser, ui_server, browser_env, capsys):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(ui_server.base + "/")
    _wait(lambda: d.title == "llama-ui", 60, "the page's title")
    _wait(lambda: "gemma" in d.find_element(By.TAG_NAME, "body").text.lower(), 60, "the model's name in the page")
    assert _severe(d, [TOOLS_OFF]) == []

    first = _send(d, "Name a color.", 1)
    assert len(first) >= 2, f"the reply did not stream (one update only): {first}"
    assert len(first[-1]) > len(first[0])
    second = _send(d, "And another one?", 2)
    assert second[-1].strip()
    assert len(_assistant_texts(d)) == 2
    page = d.find_element(By.TAG_NAME, "body").text
    assert "Name a color." in page and "And another one?" in page
    shot = browser_env[2] / "webui-chat.png"
    d.save_screenshot(str(shot))

    # the settings show the server's props: --ui-config's system message, the flags' sampling
    d.find_element(By.CSS_SELECTOR, "button[aria-label=Settings]").click()
    system = _wait(lambda: d.find_elements(By.ID, "systemMessage"), 30, "the system message setting")[0]
    assert system.get_attribute("value") == UI_CONFIG["systemMessage"]
    _click_text(d, "Sampling & Penalties")
    temp = _wait(lambda: d.find_elements(By.ID, "temperature"), 30, "the temperature setting")[0]
    assert temp.get_attribute("placeholder") == "Default: 0.42"
    assert d.find_element(By.ID, "top_k").get_attribute("placeholder") == "Default: 17"
    d.save_screenshot(str(browser_env[2] / "webui-settings.png"))
    assert _severe(d, [TOOLS_OFF]) == []
    with capsys.disabled():
        print(f"\nweb UI screenshots: {browser_env[2]}/webui-chat.png, webui-settings.png")


def test_api_key_entered_in_the_page(browser, browser_env, gemma_path):
    from selenium.webdriver.common.by import By

    srv = _serve(gemma_path, "--api-key", "sk-webui-test")
    try:
        d = browser
        d.get(srv.base + "/")
        _wait(lambda: "Enter API Key" in d.find_element(By.TAG_NAME, "body").text, 60, "the API key prompt")
        d.get_log("browser")  # the 401s that bring the prompt up, as upstream's server answers
        d.find_element(By.XPATH, "//button[normalize-space()='Enter API Key']").click()
        box = _wait(lambda: d.find_elements(By.ID, "api-key-input"), 30, "the API key box")[0]
        box.send_keys("sk-webui-test")
        d.find_element(By.XPATH, "//button[normalize-space()='Save & Retry']").click()
        _wait(lambda: [e for e in d.find_elements(By.CSS_SELECTOR, "textarea") if e.is_displayed()], 60,
              "the chat once the key is entered")
        reply = _send(d, "Say hello.", 1)
        assert reply[-1].strip()
        assert _severe(d, [TOOLS_OFF]) == []
        d.save_screenshot(str(browser_env[2] / "webui-api-key.png"))
    finally:
        srv.stop()
