"""AIP_PREDICT_ROUTE (default /predict): Vertex AI's predict protocol over the other routes.

Each instance is sent through the app itself, as a request to its route with the predict
request's headers and query, all at once on their own threads (upstream: one std::async each).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import orjson

from pyllama.server.protocol import vertex
from pyllama.server.static import INTERNAL
from pyllama.server.streaming import write_json


class PredictResource:
    """POST <AIP_PREDICT_ROUTE>."""

    json_body = "raw"  # a bad body is this route's own 400
    sleep_bypass = ("POST",)  # each instance's own route wakes the model if it needs it

    def __init__(self, app, routes: dict, prefix: str = "") -> None:
        """`routes`: every route the predict protocol may reach, path -> HTTP method."""
        self.app = app
        self.routes = routes
        self.prefix = prefix
        self.aliases = vertex.aliases(list(routes))

    def on_post(self, req, resp):
        instances = vertex.parse_instances(req.context.raw_body)
        if not instances:
            write_json(resp, {"predictions": []})
            return
        with ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix="pyllama-predict") as pool:
            predictions = list(pool.map(lambda i: self._predict(req.env, i), instances))
        write_json(resp, {"predictions": predictions})

    def _predict(self, env: dict, instance):
        try:
            path, payload = vertex.route_of(instance, self.aliases, self.routes)
            content_type, body = self._call(env, self.routes[path], self.prefix + path, payload)
            return vertex.prediction(content_type, body)
        except Exception as exc:  # an instance's failure is its own prediction
            return vertex.error_prediction(exc)

    def _call(self, env: dict, method: str, path: str, payload: dict) -> tuple[str, bytes]:
        """Run one request through the app: (content type, body)."""
        data = orjson.dumps(payload)
        inner = {k: v for k, v in env.items() if k != "HTTP_TRANSFER_ENCODING"}
        inner.update({"REQUEST_METHOD": method, "PATH_INFO": path.encode().decode("latin-1"),
                      "CONTENT_LENGTH": str(len(data)), "wsgi.input": io.BytesIO(data),
                      INTERNAL: True})
        seen = {}

        def start_response(status, headers, exc_info=None):
            seen.update({k.lower(): v for k, v in headers})

        result = self.app(inner, start_response)
        content_type = seen.get("content-type", "")
        try:
            if content_type.startswith("text/event-stream"):
                return content_type, b""  # not read: closing it below ends whatever it runs
            return content_type, b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
