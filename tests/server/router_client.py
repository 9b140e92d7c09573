"""What the router tests share: /models read as a dict, waiting on it, and a /models/sse reader."""

from __future__ import annotations

import json
import threading
import time

import httpx

WAIT = 90  # seconds: a generous bound for a child to come up or go down on a busy machine


def models(srv, **params) -> dict:
    """GET /models as {id: entry}."""
    r = httpx.get(srv.base + "/models", params=params, timeout=WAIT)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def wait_for_models(srv, predicate, what: str) -> dict:
    """Poll /models until `predicate(models)` holds; fail after WAIT seconds saying `what`."""
    deadline = time.time() + WAIT
    while time.time() < deadline:
        found = models(srv)
        if predicate(found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {json.dumps(models(srv))[:2000]}")


def child_port(model: dict) -> int:
    """The port of a loaded model's child server, from the arguments /models shows."""
    args = model["status"]["args"]
    return int(args[args.index("--port") + 1])


class ModelEvents:
    """A /models/sse client on a thread of its own, keeping every event."""

    def __init__(self, srv) -> None:
        self.events: list = []
        self.client = httpx.Client(timeout=httpx.Timeout(WAIT, read=None))
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(srv.base + "/models/sse",), daemon=True)
        self.thread.start()
        assert self.connected.wait(30)

    def _run(self, url: str) -> None:
        try:
            with self.client.stream("GET", url) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                self.connected.set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
        except (httpx.HTTPError, RuntimeError):
            pass

    def wait_for(self, expected, what: str = "") -> list:
        """Wait for an event equal to `expected` (a dict) or satisfying it (a predicate, described
        by `what`)."""
        match = expected if callable(expected) else (lambda e: e == expected)
        deadline = time.time() + WAIT
        while time.time() < deadline:
            if any(match(e) for e in list(self.events)):
                return list(self.events)
            time.sleep(0.05)
        raise AssertionError(f"no SSE event {what or expected}: {self.events}")

    def close(self) -> None:
        self.client.close()
