"""Latency histograms and request counters for /metrics, beside upstream's llamacpp:* text.

Upstream's `llamacpp:*` counters and gauges (protocol/info.py `metrics_text`) keep their names
and meanings. These are ours, with the `pyllama:` prefix and vLLM's names and bucket boundaries
(vllm/v1/metrics/loggers.py), so a vLLM dashboard reads them with the prefix changed:

    pyllama:time_to_first_token_seconds   arrival of the HTTP request -> its first token
    pyllama:inter_token_latency_seconds   between two token events of one request
    pyllama:e2e_request_latency_seconds   arrival -> the request's last event
    pyllama:request_queue_time_seconds    queued in the engine -> a slot takes it
    pyllama:request_prompt_tokens         prompt tokens per request (cached ones too)
    pyllama:request_generation_tokens     generated tokens per request
    pyllama:request_success_total         {finished_reason}: stop, length, abort, error
    pyllama:http_requests_total           {method, route, status}: every HTTP answer but the
                                          GETs of /metrics, /health, /props and /slots

Times are taken on the HTTP thread as events arrive (Run.next), so they are what a client
sees; the engine thread gains nothing but two timestamps per request (queued, admitted).
Aborted requests (a client gone, a cancel) count in request_success only: their latencies say
nothing about the server. With PROMETHEUS_MULTIPROC_DIR set (prometheus_client's multiprocess
mode), the values live in files there and /metrics sums every worker's, dead ones included.
Imports: prometheus_client, falcon, public `engine` names, the protocol base.
"""

from __future__ import annotations

import os
import time

import falcon
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

from pyllama.engine import FinishEvent, FinishReason, TokenEvent
from pyllama.server.protocol.base import Run

PREFIX = "pyllama:"

# vLLM's boundaries (PrometheusStatLogger): time to first token ...
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# ... inter-token latency (also its time_per_output_token) ...
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
# ... and request_latency_buckets: e2e and queue time
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# the engine's reasons as vLLM's finished_reason values (OpenAI's finish_reason, plus abort/error)
FINISHED_REASONS = {FinishReason.EOS: "stop", FinishReason.WORD: "stop", FinishReason.LIMIT: "length",
                    FinishReason.CANCELLED: "abort", FinishReason.ERROR: "error"}


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's build_1_2_5_buckets(max_model_len))."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class RequestMetrics:
    """This worker's pyllama:* metrics (prometheus_client). Thread-safe.

    Made with the ServerState when --metrics is on; the per-request histograms exist once the
    model is loaded (`bind`), as their token buckets follow the slot's context size.
    """

    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series (vLLM's choice too)
        self.registry = CollectorRegistry()
        self.http = Counter(PREFIX + "http_requests", "HTTP requests answered, by method, route and status.",
                            ["method", "route", "status"], registry=self.registry)
        self.bound = False

    def bind(self, model_name: str, max_model_len: int) -> None:
        """Create the per-request metrics for the loaded model (once; a wake from sleep keeps them)."""
        if self.bound:
            return
        r, labels = self.registry, ["model_name"]
        token_buckets = build_1_2_5_buckets(max(1, max_model_len))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds",
                               "Histogram of time spent waiting for a slot, in seconds.",
                               labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Number of prompt tokens per request.",
                                       labels, buckets=token_buckets, registry=r).labels(model_name)
        self.generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                           "Number of generated tokens per request.",
                                           labels, buckets=token_buckets, registry=r).labels(model_name)
        success = Counter(PREFIX + "request_success", "Count of finished requests, by finish reason.",
                          labels + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in ("stop", "length", "abort", "error")}
        self.bound = True

    def run(self, engine, call, metrics, t_arrival: float | None) -> Run:
        """A Run of `call` whose events are measured (a plain Run before the model is bound)."""
        if not self.bound:
            return Run(engine, call, metrics)
        return MeasuredRun(engine, call, metrics, self, t_arrival or time.monotonic())

    def text(self) -> str:
        """The Prometheus text of these metrics (every worker's, in multiprocess mode)."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return prometheus_client.generate_latest(registry).decode()


class MeasuredRun(Run):
    """A Run that times its requests' events for RequestMetrics. HTTP thread (its consumer)."""

    def __init__(self, engine, call, metrics, recorder: RequestMetrics, t_arrival: float) -> None:
        self._rec = recorder
        self._t0 = t_arrival
        self._last: dict = {}  # task index -> monotonic time of its latest token event
        self._done: set = set()  # task indices already counted in request_success
        self._in_next = False
        self._started = False
        super().__init__(engine, call, metrics)  # submits; a refused request is never counted
        self._started = True

    def next(self, timeout, block: bool = True):
        self._in_next = True
        try:
            item = Run.next(self, timeout, block)
        except BaseException:  # an ErrorEvent (or a protocol error): the call is over
            self._count_rest("error")
            raise
        finally:
            self._in_next = False
        if item is not None:
            task, event = item
            kind = type(event)
            if kind is TokenEvent:
                if event.tokens:  # the flush before a FinishEvent carries text, no token
                    now = time.monotonic()
                    last = self._last.get(task.index)
                    if last is None:
                        self._rec.ttft.observe(now - self._t0)
                    else:
                        self._rec.itl.observe(now - last)
                    self._last[task.index] = now
            elif kind is FinishEvent:
                self._finished(task.index, event)
        return item

    def cancel(self) -> None:
        Run.cancel(self)
        if self._started and not self._in_next:  # the client went away (Run.next cancels on errors)
            self._count_rest("abort")

    def _finished(self, index: int, event: FinishEvent) -> None:
        if index in self._done:
            return
        self._done.add(index)
        rec = self._rec
        reason = FINISHED_REASONS.get(event.reason, "stop")
        rec.success[reason].inc()
        if reason == "abort":
            return
        now = time.monotonic()
        if index not in self._last and event.timings.predicted_n > 0:
            rec.ttft.observe(now - self._t0)  # every token held back (a stop string, EOS): seen now
        rec.e2e.observe(now - self._t0)
        handle = next((h for h in self.handles if h.tag == index), None)  # submitted with tag=index
        if handle is not None and getattr(handle, "t_admitted", 0.0) and handle.t_queued:
            rec.queue.observe(handle.t_admitted - handle.t_queued)
        rec.prompt_tokens.observe(event.n_prompt_tokens)
        rec.generation_tokens.observe(event.timings.predicted_n)

    def _count_rest(self, reason: str) -> None:
        for task in self.call.tasks:
            if task.index not in self._done:
                self._done.add(task.index)
                self._rec.success[reason].inc()


# Scrapes, probes and status polls are not counted: a /metrics text must not change while the
# server is idle (upstream's test_server_sleep_read_only_endpoints compares two scrapes whole),
# and Kubernetes probes would otherwise outnumber every other request.
UNCOUNTED_GETS = frozenset({"/metrics", "/health", "/v1/health", "/props", "/slots"})


class HttpMetrics:
    """Falcon middleware, first in the chain: stamps each request's arrival and counts its answer."""

    def __init__(self, recorder: RequestMetrics) -> None:
        self.recorder = recorder

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.context.t_arrival = time.monotonic()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded) -> None:
        try:
            status = str(falcon.http_status_to_code(resp.status))
        except ValueError:
            status = str(resp.status)
        route = req.uri_template or "unmatched"
        if req.method == "GET" and route in UNCOUNTED_GETS:
            return
        self.recorder.http.labels(req.method, route, status).inc()
