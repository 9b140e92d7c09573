"""/health, /models, /props, /slots (and slot actions), /metrics, /lora-adapters."""

from __future__ import annotations

import falcon

from pyllama.errors import NotSupportedError, UnavailableError
from pyllama.server import health
from pyllama.server.protocol import info
from pyllama.server.streaming import write_json


class HealthResource:
    sleep_bypass = ("GET",)  # answered while asleep, without waking (server/sleep.py)

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        health.check(self.state)  # loading, or a dead or wedged engine thread: 503
        write_json(resp, {"status": "ok"})


class ModelsResource:
    sleep_bypass = ("GET",)

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        write_json(resp, self.state.models())


class PropsResource:
    sleep_bypass = ("GET",)  # POST /props wakes the model, as upstream's post_props

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        write_json(resp, self.state.props())

    def on_post(self, req, resp):
        if not self.state.settings.props:
            raise NotSupportedError("This server does not support changing global properties. Start it with `--props`")
        write_json(resp, {"success": True})


class SlotsResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        if not self.state.settings.slots:
            raise NotSupportedError("This server does not support slots endpoint. Start it with `--slots`")
        slots = info.slots(self.state.engine, self.state.protocol)
        if req.get_param("fail_on_no_slot") is not None and all(s["is_processing"] for s in slots):
            raise UnavailableError("no slot available")
        write_json(resp, slots)


class SlotActionResource:
    """POST /slots/{id}?action=save|restore|erase (needs --slot-save-path)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp, id_slot):
        folder = self.state.settings.slot_save_path
        if not folder:
            raise NotSupportedError("This server does not support slots action. Start it with `--slot-save-path`")
        write_json(resp, info.slot_action(self.state.engine, self.state.protocol, folder, id_slot,
                                          req.get_param("action"), req.context.body))


class MetricsResource:
    """GET /metrics: Prometheus text with llama-server's llamacpp:* names, then our pyllama:*
    histograms and counters (server/metrics.py); only with --metrics."""

    sleep_bypass = ("GET",)  # the engine's stats are those kept when it went to sleep

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        if not self.state.settings.metrics:
            raise NotSupportedError("This server does not support metrics endpoint. Start it with `--metrics`")
        resp.status = falcon.HTTP_200
        resp.content_type = "text/plain; version=0.0.4"
        resp.set_header("Process-Start-Time-Unix", str(self.state.start_us))
        metrics = self.state.metrics
        resp.text = info.metrics_text(metrics, self.state.engine.stats()) + metrics.requests.text()


class LoraAdaptersResource:
    """GET/POST /lora-adapters: the adapters loaded with --lora and their server-wide scales."""

    json_body = "any"  # the body is an array

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        write_json(resp, info.lora_list(self.state.engine))

    def on_post(self, req, resp):
        engine = self.state.engine
        engine.set_lora_scales(info.parse_lora(req.context.body, len(engine.lora_paths)))
        write_json(resp, {"success": True})
