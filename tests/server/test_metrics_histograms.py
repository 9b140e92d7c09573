"""/metrics' pyllama:* histograms and counters after a known load, read with prometheus_client's
own parser, beside upstream's llamacpp:* metrics (server/metrics.py)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyllama.server.metrics import (ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS,
                                    build_1_2_5_buckets)

from .conftest import ServerProcess

N_CTX_SLOT = 1024  # -c 2048 -np 2


def scrape(client) -> dict:
    """{family name: {(sample name, frozen labels): value}} of one GET /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = (family.type, {(s.name, frozenset(s.labels.items())): s.value
                                               for s in family.samples})
    return families


def value(families, family, sample=None, **labels) -> float:
    kind, samples = families[family]
    sample = sample or family
    return sum(v for (name, ls), v in samples.items() if name == sample and set(labels.items()) <= ls)


def buckets(families, family) -> list[float]:
    _, samples = families[family]
    return sorted(float(dict(ls)["le"]) for name, ls in samples if name == family + "_bucket")


@pytest.fixture(scope="module")
def metrics_server(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "2048", "--metrics"])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_buckets_are_vllms():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(1024)[-1] == 1000
    assert len(TTFT_BUCKETS) == 22 and len(ITL_BUCKETS) == 19 and len(REQUEST_LATENCY_BUCKETS) == 21


def test_histograms_count_a_known_load(metrics_server, synthetic_path):
    with httpx.Client(base_url=metrics_server.base, timeout=60) as client:
        before = scrape(client)
        assert value(before, "pyllama:time_to_first_token_seconds", "pyllama:time_to_first_token_seconds_count") == 0
        # n_probs: every token is an event of its own (no text held back), ignore_eos: n_predict each
        body = {"prompt": "hello world", "n_predict": 8, "n_probs": 1, "ignore_eos": True}
        answers = [client.post("/completion", json=body).json() for _ in range(3)]
        for n_predict in (5, 6):
            with client.stream("POST", "/completion", json={**body, "n_predict": n_predict, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            answers.append(httpx.Response(200, content=lines[-1][6:]).json())
        assert client.post("/completion", json={"n_predict": 4}).status_code == 400  # no prompt
        after = scrape(client)
        # scrapes and probes are not counted: an idle server's /metrics reads the same twice
        # (the first scrape after work resets upstream's throughput windows)
        client.get("/health")
        client.get("/metrics")
        assert client.get("/metrics").text == client.get("/metrics").text

    n = len(answers)
    predicted = [a["tokens_predicted"] for a in answers]
    assert predicted == [8, 8, 8, 5, 6]
    count = lambda family: value(after, family, family + "_count")  # noqa: E731
    total = lambda family: value(after, family, family + "_sum")  # noqa: E731
    for family in ("pyllama:time_to_first_token_seconds", "pyllama:e2e_request_latency_seconds",
                   "pyllama:request_queue_time_seconds", "pyllama:request_prompt_tokens",
                   "pyllama:request_generation_tokens"):
        assert after[family][0] == "histogram", family
        assert count(family) == n, family
        assert value(after, family, family + "_bucket", le="+Inf") == n, family
    assert count("pyllama:inter_token_latency_seconds") == sum(p - 1 for p in predicted)
    assert total("pyllama:request_generation_tokens") == sum(predicted)
    assert total("pyllama:request_prompt_tokens") == sum(a["tokens_evaluated"] for a in answers)
    # an e2e latency holds its time to first token and every gap after it
    assert total("pyllama:e2e_request_latency_seconds") >= total("pyllama:time_to_first_token_seconds")
    assert buckets(after, "pyllama:time_to_first_token_seconds") == [*TTFT_BUCKETS, float("inf")]
    assert buckets(after, "pyllama:inter_token_latency_seconds") == [*ITL_BUCKETS, float("inf")]
    assert buckets(after, "pyllama:e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS, float("inf")]
    assert buckets(after, "pyllama:request_queue_time_seconds") == [*REQUEST_LATENCY_BUCKETS, float("inf")]
    assert buckets(after, "pyllama:request_prompt_tokens") == [*build_1_2_5_buckets(N_CTX_SLOT), float("inf")]

    success = "pyllama:request_success"
    assert after[success][0] == "counter"
    assert value(after, success, success + "_total", finished_reason="length") == n
    for reason in ("stop", "abort", "error"):
        assert value(after, success, success + "_total", finished_reason=reason) == 0, reason
    model = dict(next(iter(after[success][1]))[1])["model_name"]
    assert model == str(synthetic_path)

    http = "pyllama:http_requests"

    def got(**labels):
        return value(after, http, http + "_total", **labels) - value(before, http, http + "_total", **labels)

    assert got(method="POST", route="/completion", status="200") == n
    assert got(method="POST", route="/completion", status="400") == 1
    assert got(method="GET", route="/metrics", status="200") == 0
    # upstream's metrics are still there, with their names and meanings
    assert value(after, "llamacpp:tokens_predicted", "llamacpp:tokens_predicted_total") == sum(predicted)
    assert value(after, "llamacpp:requests_processing") == 0


def test_a_client_that_leaves_counts_as_abort(metrics_server):
    with httpx.Client(base_url=metrics_server.base, timeout=60) as client:
        before = scrape(client)
        body = {"prompt": "go on", "n_predict": 1000, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/completion", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first token, then the client goes
        deadline = time.time() + 30
        abort = "pyllama:request_success"
        while time.time() < deadline:
            after = scrape(client)
            if value(after, abort, abort + "_total", finished_reason="abort") == 1:
                break
            time.sleep(0.1)
    for reason, n in (("abort", 1), ("length", 0), ("error", 0)):
        delta = value(after, abort, abort + "_total", finished_reason=reason) - \
            value(before, abort, abort + "_total", finished_reason=reason)
        assert delta == n, reason
    # its time to first token counts; an end it never had does not
    e2e = "pyllama:e2e_request_latency_seconds"
    ttft = "pyllama:time_to_first_token_seconds"
    assert value(after, e2e, e2e + "_count") == value(before, e2e, e2e + "_count")
    assert value(after, ttft, ttft + "_count") == value(before, ttft, ttft + "_count") + 1


def test_multiprocess_mode_keeps_a_dead_workers_counts(synthetic_path, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR: every worker writes there and /metrics sums them, so a worker
    the master replaced still counts."""
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--metrics"],
                        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    try:
        srv.wait_ready()
        body = {"prompt": "hello", "n_predict": 3, "ignore_eos": True}
        with httpx.Client(base_url=srv.base, timeout=60) as client:
            assert client.post("/completion", json=body).status_code == 200
            first = scrape(client)
        e2e = "pyllama:e2e_request_latency_seconds"
        assert value(first, e2e, e2e + "_count") == 1
        assert any(name.endswith(".db") for name in os.listdir(tmp_path))
        worker = int(open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read().split()[0])
        os.kill(worker, signal.SIGKILL)  # the master starts another worker
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                children = open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read().split()
                if children and int(children[0]) != worker and \
                        httpx.get(srv.base + "/health", timeout=2).status_code == 200:
                    break
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
        with httpx.Client(base_url=srv.base, timeout=60) as client:
            assert client.post("/completion", json=body).status_code == 200
            second = scrape(client)
        assert value(second, e2e, e2e + "_count") == 2
        gen = "pyllama:request_generation_tokens"
        assert value(second, gen, gen + "_sum") == 6
    finally:
        srv.stop()
