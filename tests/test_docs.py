"""/docs (Swagger UI from the installed package, no CDN) and the / landing page.

The docs page is loaded in a real headless Chromium (the Debian package ``chromium``),
driven over the DevTools protocol: the operations must render from /openapi.json, "Try it
out" on POST /rerank must send a request this server answers with 200, and every request
the page makes must go to this server (external hosts do not even resolve).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from reranker.api.app import create_app
from reranker.api.docs import STATIC_FILES
from tests.conftest import make_settings
from tests.scripts import require_tool
from tests.server import ServerThread

RERANK_BODY = {"query": "capital of france", "documents": ["bananas are yellow", "Paris is in France"]}


@pytest.fixture(scope="module")
def model_server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings())) as server:
        yield server


def test_docs_page_and_its_files_are_served_from_the_package(model_server: ServerThread) -> None:
    with model_server.client() as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in page.text and "http" not in page.text.replace("http-equiv", "")
        for name, media_type in STATIC_FILES.items():
            served = client.get(f"/docs/static/{name}")
            assert served.status_code == 200 and served.headers["content-type"].startswith(media_type)
        assert client.get("/docs/static/index.css").status_code == 404  # only the files the page uses
        assert client.get("/docs/static/..%2F__init__.py").status_code == 404


def test_landing_page_is_html_for_a_browser_and_json_otherwise(model_server: ServerThread) -> None:
    with model_server.client() as client:
        html = client.get("/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        facts = client.get("/").json()
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    for text in ("all-MiniLM-L6-v2", "torch / cpu", 'href="/docs"', 'href="/health"', 'href="/metrics"'):
        assert text in html.text
    assert facts["model"]["name"] == "all-MiniLM-L6-v2" and facts["model"]["backend"] == "torch"
    assert facts["status"] == "healthy" and facts["links"]["docs"] == "/docs"


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page, flattened session)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        self.process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline but for us
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        for line in self.process.stderr:  # Chromium says where its DevTools endpoint is
            if line.startswith("DevTools listening on "):
                endpoint = line.removeprefix("DevTools listening on ").strip()
                break
        else:
            raise RuntimeError("chromium exited without a DevTools endpoint")
        self.socket: ClientConnection = connect(endpoint, max_size=None, open_timeout=30)
        self.ids = count(1)
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"id": next(self.ids), "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=120))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page, awaiting a promise; its value comes back as JSON."""
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


# Page-side helper: resolves when ``probe()`` is truthy (checked on every DOM change), or rejects.
WAIT_FOR = """
var waitFor = (probe, what, timeoutMs = 60000) => new Promise((resolve, reject) => {
  const check = () => { const value = probe(); if (value) { observer.disconnect(); resolve(value); } };
  const observer = new MutationObserver(check);
  observer.observe(document, {childList: true, subtree: true, characterData: true, attributes: true});
  setTimeout(() => { observer.disconnect(); reject(new Error("timed out waiting for " + what)); }, timeoutMs);
  check();
});
"""

RENDERED_PATHS = (
    WAIT_FOR
    + """
waitFor(() => document.querySelectorAll(".opblock").length > 0, "operations").then(() =>
  [...document.querySelectorAll(".opblock")].map(block => {
    const path = block.querySelector(".opblock-summary-path");
    const method = block.querySelector(".opblock-summary-method");
    return method.textContent.trim() + " " + (path.dataset.path || path.textContent.trim());
  }))
"""
)

TRY_RERANK = (
    WAIT_FOR
    + """
(async () => {
  const block = [...document.querySelectorAll(".opblock-post")].find(
    b => b.querySelector(".opblock-summary-path").dataset.path === "/rerank");
  block.querySelector("button.opblock-summary-control").click();
  const textarea = await waitFor(() => block.querySelector("textarea.body-param__text"), "body editor");
  const setValue = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value").set;
  setValue.call(textarea, BODY);  // React owns the textarea: set it as a user's typing would
  textarea.dispatchEvent(new Event("input", {bubbles: true}));
  const execute = await waitFor(() => block.querySelector("button.execute"), "Execute button");
  execute.click();
  const status = await waitFor(
    () => block.querySelector(".live-responses-table tr.response .response-col_status"), "live response");
  const body = await waitFor(
    () => block.querySelector(".live-responses-table .microlight, .live-responses-table pre"), "body");
  return {status: status.textContent.trim(), body: body.textContent};
})()
"""
)


def test_swagger_ui_renders_offline_in_chromium_and_try_it_out_reranks(
    model_server: ServerThread, tmp_path: Path
) -> None:
    chromium = require_tool("chromium")
    browser = Browser(chromium, tmp_path / "profile")
    try:
        browser.call("Page.navigate", session=True, url=f"{model_server.url}/docs")
        operations = browser.evaluate(RENDERED_PATHS)
        for operation in (
            "POST /rerank",
            "POST /v1/rerank",
            "POST /v2/rerank",
            "POST /v1/embeddings",
            "GET /health",
        ):
            assert operation in operations, operations
        answer = browser.evaluate(TRY_RERANK.replace("BODY", json.dumps(json.dumps(RERANK_BODY))))
        assert answer["status"] == "200", answer
        results = json.loads(answer["body"])["results"]
        assert results[0]["index"] == 1  # Paris ranks first: the model really answered
        requested = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        assert f"{model_server.url}/rerank" in requested
        elsewhere = [url for url in requested if not url.startswith((model_server.url, "data:"))]
        assert elsewhere == []  # nothing from a CDN: the page works offline
    finally:
        browser.close()
