"""The page `islands serve` shows at /, driven in Debian's headless Chromium against real
servers: images decoded with a routing strip per image, streamed text, the status line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is absent (Debian package chromium)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """One Chromium for the module, on a fresh profile; no browser is downloaded."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 800})
        yield context
        context.close()


def opened(browser: Any, url: str) -> tuple[Any, list[str]]:
    """The page at url, ready to generate; the script errors it raises are collected."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url + "/")
    page.wait_for_selector("#generate:enabled", timeout=WAIT_MS)
    page.wait_for_function("document.getElementById('ready').dataset.state === 'ready'",
                           timeout=WAIT_MS)
    return page, errors


def test_image_page_shows_each_image_with_its_routing_strip(browser, image_server) -> None:
    page, errors = opened(browser, image_server.url)
    legend = page.eval_on_selector_all(
        "#legend span", "spans => spans.map(s => [s.textContent, getComputedStyle(s)"
        ".backgroundColor])")
    assert [text.split(" @ ")[0] for text, _ in legend] == ["expert 0", "expert 1"]
    colour_of = {colour: k for k, (_, colour) in enumerate(legend)}
    assert len(colour_of) == 2
    assert "2 of 2 experts up" in page.text_content("#ready")

    page.select_option("#strategy", "full")
    page.fill("#n", "3")
    page.fill("#steps", "5")
    page.check("#deterministic")
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    assert sent.value.post_data_json == {"seed": 0, "deterministic": True, "n": 3, "steps": 5,
                                         "routing": {"strategy": "full", "k": 2}}
    page.wait_for_function("document.getElementById('info').textContent.includes(' in ')",
                           timeout=WAIT_MS)
    page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete)",
                           timeout=WAIT_MS)
    figures = page.eval_on_selector_all("#grid figure", """figures => figures.map(f => {
        const img = f.querySelector('img');
        return {width: img.naturalWidth, shown: img.width,
                cells: [...f.querySelectorAll('.strip span')].map(c =>
                    [c.dataset.expert, getComputedStyle(c).backgroundColor])};
    })""")
    assert page.text_content("#error") == ""
    assert len(figures) == 3
    for figure in figures:
        assert figure["width"] > 0  # a decoded PNG
        assert figure["shown"] % figure["width"] == 0 and figure["shown"] >= figure["width"]
        assert len(figure["cells"]) == 5  # one per step
        for expert, colour in figure["cells"]:
            assert colour_of.get(colour) == int(expert), (colour, expert, legend)
    assert page.text_content("#info").startswith("3 images, 5 steps in ")
    assert errors == []
    page.close()


def test_image_page_names_the_field_of_a_refused_request(browser, image_server) -> None:
    page, errors = opened(browser, image_server.url)
    assert page.get_attribute("#k", "max") == "2"  # the browser refuses k > experts itself
    page.eval_on_selector("#k", "k => k.removeAttribute('max')")  # so the server has to
    page.select_option("#strategy", "topk")
    page.fill("#k", "5")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent !== ''",
                           timeout=WAIT_MS)
    assert "routing.k" in page.text_content("#error")
    assert page.is_enabled("#generate")
    assert errors == []
    page.close()


def test_image_page_shows_overload_and_a_degraded_ensemble(browser, image_server) -> None:
    """A 429 and a degraded /readyz as the server words them (tests/test_serve.py provokes
    both for real), answered here by the browser so the page's reading of them is checked."""
    page, errors = opened(browser, image_server.url)
    page.route("**/v1/images/generations", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "3"}, content_type="application/json",
        body=json.dumps({"error": {"message": "queue full: 4 waiting", "type":
                                   "rate_limit_exceeded", "param": None, "code": None}})))
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent !== ''",
                           timeout=WAIT_MS)
    assert page.text_content("#error") == "server busy (queue full: 4 waiting): retry after 3 s"
    page.route("**/readyz", lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=json.dumps({"ready": True, "degraded": True, "experts": 2, "up": 1,
                         "down": ["expert-1"], "layout": "deployments"})))
    page.wait_for_function("document.getElementById('ready').dataset.state === 'degraded'",
                           timeout=WAIT_MS)  # polled every few seconds
    assert page.text_content("#ready") == "degraded: 1 of 2 experts up (expert-1 down)"
    assert page.eval_on_selector_all("#legend span.down", "s => s.map(x => x.dataset.expert)"
                                     ) == ["1"]
    assert errors == []
    page.close()


def test_text_page_streams_a_completion(browser, text_server) -> None:
    page, errors = opened(browser, text_server.url)
    assert page.is_visible("#prompt") and not page.is_visible("#n")
    page.fill("#prompt", "The ")
    page.fill("#max_tokens", "24")
    page.select_option("#strategy", "full")
    page.click("#generate")
    page.wait_for_function("document.getElementById('info').textContent.includes(' in ')",
                           timeout=WAIT_MS)
    assert page.text_content("#error") == ""
    shown = page.text_content("#text")
    assert shown.startswith("The ") and len(shown) > len("The ")
    assert page.text_content("#text .generated") != ""
    assert page.eval_on_selector_all("#text-routing .strip span", "cells => cells.length") > 0
    assert page.text_content("#text-routing").startswith("routing: ")
    assert " bytes (finish: " in page.text_content("#info")
    assert errors == []
    page.close()
