"""The chat page in a real headless browser (Debian's chromium driven by Playwright): type a
message, watch the answer arrive in several pieces, and read the same text the API gives."""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'switchformer[serve]'")
pytest.importorskip("playwright", reason="playwright is not installed (dev extra)")

import httpx  # noqa: E402
from serve_helpers import make_app, serving, tiny_lm, tokenizer  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the machine's notes say: without the background-networking flags chromium keeps dialling out
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_chat_page_streams_an_answer():
    from playwright.sync_api import sync_playwright

    model, tok = tiny_lm(), tokenizer()
    app, engine = make_app(model, tok)
    step = engine._step

    def slow_step():  # 30 ms a token, so that the page visibly receives the answer piece by piece
        time.sleep(0.03)
        step()

    engine._step = slow_step
    with serving(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=10_000)
            page.click("summary")  # open the settings, as a user would
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            # count the distinct texts the answer shows while it streams
            page.evaluate("""() => {
                window.seen = new Set();
                new MutationObserver(() => {
                    const a = document.querySelector('.assistant');
                    if (a) window.seen.add(a.textContent);
                }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-state=done]", timeout=30_000)
            shown = page.text_content(".assistant")
            pieces = page.evaluate("window.seen.size")
            assert page.text_content(".user") == "hello there"
        finally:
            browser.close()
        api = httpx.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "max_tokens": 24,
        }, timeout=30).json()  # fmt: skip
    assert shown == api["choices"][0]["message"]["content"] and shown
    assert pieces >= 3, f"the answer appeared in {pieces} updates: not streamed"
