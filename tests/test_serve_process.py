"""Issue 11 against real server processes: `kblam serve` on the default model with the official OpenAI
client and a real browser (Playwright driving the system's Chromium), and kill -9 during writes.

The browser test needs Debian's chromium (`apt-get install chromium`; .ci/run installs it); Playwright's
own browser download is not used. KBLAM_SCREENSHOT=FILE keeps its screenshot (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import ELEMENTS, ROOT, hash_encoder, make_store

from kblam.kb import Triple
from kblam.store import KBStore

CHROMIUM = "/usr/bin/chromium"
GOLD = "What is the symbol of gold?"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def start(command: list[str], pattern: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start a server process; return it and the URL from the line matching `pattern` (group 1: port)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            url = f"http://127.0.0.1:{found.group(1)}"
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        return proc, url
                except httpx.TransportError:
                    time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines[-30:]))


# --- the default model: `kblam serve`, the OpenAI client, the browser ------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("served") / "kb.kbstore"
    proc, url = start([sys.executable, "-m", "kblam.cli", "serve", str(store), "--create", "--port", "0",
                       "--log-level", "warning"], r"on http://127\.0\.0\.1:(\d+)")
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn finishes what is in flight, then the CLI's exit code for it
    assert proc.wait(30) == 130


def _import_elements(url: str) -> None:
    with open(ELEMENTS, "rb") as fh:
        got = httpx.post(f"{url}/v1/kb/import", files={"file": ("elements.csv", fh)}, timeout=120)
    assert got.status_code == 200, got.text


@pytest.mark.slow
def test_the_openai_client_against_kblam_serve(default_server):
    from openai import OpenAI

    _import_elements(default_server)  # an upsert: Gold's symbol is Au again whatever ran before
    client = OpenAI(base_url=f"{default_server}/v1", api_key="not-needed-on-loopback")
    done = client.chat.completions.create(model="kblam", messages=[{"role": "user", "content": GOLD}])
    assert "Au" in done.choices[0].message.content
    sources = [(s["name"], s["property"], s["value"]) for s in done.model_extra["kblam"]["sources"]]
    assert sources[0] == ("Gold", "symbol", "Au")
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="kblam", messages=[{"role": "user", "content": GOLD}], stream=True) if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == done.choices[0].message.content


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_the_page_in_a_browser(default_server, tmp_path):
    """Upload elements.csv, ask for gold's symbol, see Au and its source row; edit it, ask again, see the edit."""
    from playwright.sync_api import expect, sync_playwright

    profile = tempfile.mkdtemp(prefix="kblam-chromium-")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, viewport={"width": 1100, "height": 900},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            outside: list[str] = []
            browser.on("request", lambda r: None if r.url.startswith((default_server, "data:", "blob:"))
                       else outside.append(r.url))
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(default_server)
            expect(page.locator("#kb-status")).to_contain_text("triples")

            page.get_by_label("Import a KB file").set_input_files(str(ELEMENTS))
            page.get_by_role("button", name="Import", exact=True).click()
            expect(page.get_by_role("status")).to_contain_text("Imported elements.csv: 50 triples in the file")

            page.get_by_label("Question", exact=True).fill(GOLD)
            page.get_by_label("Question", exact=True).press("Enter")  # the keyboard submits
            expect(page.locator("#answer-text")).to_contain_text("Au", timeout=60_000)
            source = page.locator("#sources tbody tr").first
            expect(source).to_have_text(re.compile(r"Gold\s*symbol\s*Au\s*\d+\.\d%"))
            expect(page.locator("#chart rect.bar")).to_have_count(5)
            _screenshot(page, Path(os.environ.get("KBLAM_SCREENSHOT") or tmp_path / "page.png"))

            page.get_by_label("Search the triples").fill("gold")
            page.get_by_label("Search the triples").press("Enter")
            expect(page.locator("#page-info")).to_contain_text("1–4 of 4")
            page.get_by_role("button", name="Edit Gold · symbol").click()
            editor = page.get_by_label("New value for Gold · symbol")
            expect(editor).to_be_focused()
            editor.fill("Zz")
            editor.press("Enter")
            expect(page.get_by_role("status")).to_contain_text("Saved: Gold · symbol is now “Zz”")
            expect(page.locator("#triples tbody tr[data-property='symbol'] td.value")).to_have_text("Zz")

            page.get_by_label("Question", exact=True).fill(GOLD)
            page.get_by_role("button", name="Ask", exact=True).click()
            expect(page.locator("#answer-text")).to_contain_text("Zz", timeout=60_000)
            expect(page.locator("#sources tbody tr").first).to_have_text(re.compile(r"Gold\s*symbol\s*Zz"))

            page.get_by_label("Question", exact=True).fill("x" * 10)  # an error is said in words
            page.route("**/v1/ask", lambda route: route.fulfill(status=503, content_type="application/json",
                                                               body='{"error": {"message": "busy, retry"}}'))
            page.get_by_role("button", name="Ask", exact=True).click()
            expect(page.get_by_role("alert")).to_have_text("No answer: busy, retry")
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert not errors and not outside, (errors, outside)


def _screenshot(page, path: Path) -> None:
    """The README's picture: the page as the test sees it, in 48 colours (about 30 KB instead of 90)."""
    from PIL import Image

    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(colors=48, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# --- kill -9 during writes (a tiny model: the point is the store) -------------------------------------------


def test_kill_9_during_writes_loses_no_acknowledged_write(tmp_path):
    store = make_store(tmp_path / "kb.kbstore", hash_encoder(), ELEMENTS)
    command = [sys.executable, str(ROOT / "tests" / "scripts" / "tiny_serve.py"), str(store)]
    proc, url = start(command, r"^port (\d+)")
    acknowledged: list[Triple] = []
    sent: list[Triple] = []
    lock, stop = threading.Lock(), threading.Event()

    def write(w: int):
        with httpx.Client(base_url=url, timeout=10) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                t = Triple(f"writer {w} entity {i}", "serial", f"{w}-{i}")
                with lock:
                    sent.append(t)
                try:
                    got = http.post("/v1/kb/triples", json=t.to_record())
                    if i % 3 == 2:  # and change the value of one added before: a PATCH
                        earlier = Triple(f"writer {w} entity {i - 1}", "serial", f"{w}-{i - 1} changed")
                        with lock:
                            sent.append(earlier)
                        changed = http.patch("/v1/kb/triples", json=earlier.to_record())
                except httpx.TransportError:
                    return  # the server is gone
                assert got.status_code == 201, got.text
                with lock:
                    acknowledged.append(t)
                    if i % 3 == 2 and changed.status_code == 200:
                        acknowledged.append(earlier)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for t in writers:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
    proc.wait(10)
    stop.set()
    for t in writers:
        t.join()
    assert len(acknowledged) >= 60

    proc, url = start(command, r"^port (\d+)")  # the lock died with the process
    try:
        with KBStore.open(store, readonly=True) as s:
            s.verify()  # every committed byte matches its checksum
            stored = {(t.name, t.property): t.value for t in s.triples()}
        latest = {(t.name, t.property): t.value for t in acknowledged}  # the last acknowledged per pair
        for key, value in latest.items():
            assert key in stored, f"acknowledged write lost: {key}"
            later = [t.value for t in sent if (t.name, t.property) == key]
            assert stored[key] in later[later.index(value):], (key, value, stored[key])
        served = httpx.get(f"{url}/v1/kb", timeout=10).json()
        assert served["size"] == len(stored) >= 50 + len(latest)
        assert httpx.post(f"{url}/v1/kb/triples", json={"name": "after", "property": "restart", "value": "ok"},
                          timeout=10).status_code == 201
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
