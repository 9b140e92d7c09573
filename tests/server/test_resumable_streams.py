"""Resumable streams (upstream's server-stream.cpp): X-Conversation-Id, GET/DELETE /v1/stream,
POST /v1/streams/lookup.

A streamed generation with the header is teed into a per-conversation buffer that survives the
client: it is replayed from any byte offset, followed live, found by lookup, and stopped by
DELETE. The fake-engine tests script the engine; the last test runs a real server and a client
that drops its connection.
"""

from __future__ import annotations

import json
import socket
import time

import falcon.testing
import httpx
import pytest

from pyllama.server.stream_store import OffsetLost, StreamSession, StreamStore

from .fake_engine import Stream, completion, fake_app, open_stream, parse_sse

HEADER = "X-Conversation-Id"
COMPLETION = {"prompt": "Hello", "n_predict": 8, "stream": True}
CHAT = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}


@pytest.fixture
def make(synthetic_path):
    def build(script=(), **kwargs):
        return fake_app(synthetic_path, script, **kwargs)
    return build


def lookup(client, *ids):
    r = client.simulate_post("/v1/streams/lookup", json={"conversation_ids": list(ids)})
    assert r.status_code == 200
    return r.json


# --- the store on its own ---------------------------------------------------------------------
def test_session_buffer_drops_its_oldest_bytes_beyond_the_cap():
    s = StreamSession("c", max_bytes=8)
    s.append(b"abcdef")
    s.append(b"ghij")
    assert (s.total_bytes, s.dropped) == (10, 2)
    assert s.read(2) == b"cdefghij"
    with pytest.raises(OffsetLost):
        s.read(1)
    s.append(b"0123456789AB")  # one chunk over the cap keeps its tail only
    assert (s.total_bytes, s.dropped) == (22, 14)
    assert s.read(14) == b"456789AB"
    assert s.read(22, wait=0) == b""  # nothing new yet
    s.finalize()
    assert s.read(22) is None and not s.append(b"late")


def test_replay_follows_live_bytes_until_the_end():
    s = StreamSession("c")
    s.append(b"one ")
    it = s.replay(0)
    assert next(it) == b"one "
    s.append(b"two")
    assert next(it) == b"two"
    s.finalize()
    assert list(it) == []


def test_store_replace_lookup_and_expiry():
    now = [1000.0]
    store = StreamStore(ttl=300, clock=lambda: now[0])
    first = store.create_or_replace("conv")
    second = store.create_or_replace("conv")
    assert first.cancelled and first.done and store.get("conv") is second
    store.create_or_replace("conv::org/model")
    store.create_or_replace("convx")
    assert [s.conversation_id for s in store.lookup(["conv"])] == ["conv", "conv::org/model"]
    second.finalize()
    now[0] += 299
    store.sweep()
    assert store.get("conv") is second
    now[0] += 1  # 300 s after it ended
    store.sweep()
    assert store.get("conv") is None and store.get("convx") is not None  # still live
    assert store.evict_and_cancel("convx") and not store.evict_and_cancel("convx")


# --- over the app -----------------------------------------------------------------------------
def test_a_stream_with_the_header_is_replayed_byte_for_byte(make):
    client, fake = make(completion("Hello", " world"))
    r = client.simulate_post("/completion", json=COMPLETION, headers={HEADER: "conv-1"})
    assert r.status_code == 200
    [entry] = lookup(client, "conv-1")
    assert entry["conversation_id"] == "conv-1" and entry["is_done"] is True
    assert entry["total_bytes"] == len(r.content)
    assert entry["started_at"] <= entry["completed_at"] and entry["completed_at"] > 0
    replay = client.simulate_get("/v1/stream", params={"conv_id": "conv-1", "from": "0"})
    assert replay.status_code == 200 and replay.content == r.content
    assert replay.headers["content-type"] == "text/event-stream"
    assert replay.headers["x-accel-buffering"] == "no"
    tail = client.simulate_get("/v1/stream", params={"conv_id": "conv-1", "from": str(len(r.content) - 5)})
    assert tail.content == r.content[-5:]
    # std::stoull's reading of `from`: blanks and a sign, the digits, the rest ignored
    assert client.simulate_get("/v1/stream", params={"conv_id": "conv-1", "from": " 3xyz"}).content == r.content[3:]
    assert client.simulate_get("/v1/stream", params={"conv_id": "conv-1", "from": "-1"}).content == b""


def test_the_stream_outlives_its_client(make):
    client, fake = make(completion("Hello", " world", " again"), release="manual")
    fake.release(1)
    stream = open_stream(client, "/v1/chat/completions", CHAT, fake=fake, headers={HEADER: "conv-2"})
    assert stream.status_code == 200 and stream.next_chunk()
    [live] = lookup(client, "conv-2")
    assert live["is_done"] is False and live["completed_at"] == 0
    fake.release_all()
    stream.close()  # the client goes away: the generation is not cancelled, it goes on into the buffer
    assert fake.cancelled == []
    [done] = lookup(client, "conv-2")
    assert done["is_done"] is True
    frames = parse_sse(client.simulate_get("/v1/stream", params={"conv_id": "conv-2"}).content)
    text = "".join(f.data["choices"][0]["delta"].get("content") or "" for f in frames[:-1] if f.data["choices"])
    assert text == "Hello world again" and frames[-1].data == "[DONE]"


def test_a_reader_follows_a_live_stream(make):
    client, fake = make(completion("a", "b", "c"), release="manual")
    fake.release(1)
    producer = open_stream(client, "/completion", COMPLETION, fake=fake, headers={HEADER: "conv-3"})
    first = producer.next_chunk()
    environ = falcon.testing.create_environ(path="/v1/stream", query_string="conv_id=conv-3&from=0")
    reader = Stream(client.app, environ, fake, 10.0)
    assert reader.status_code == 200 and reader.next_chunk() == first
    fake.release_all()
    whole = first + producer.rest()
    assert first + reader.rest() == whole  # the reader ends when the stream does


def test_delete_stops_the_producer_and_evicts(make):
    client, fake = make(completion("a", "b", "c"), release="manual")
    fake.release(1)
    stream = open_stream(client, "/completion", COMPLETION, fake=fake, headers={HEADER: "conv-4"})
    assert stream.next_chunk()
    r = client.simulate_delete("/v1/stream", params={"conv_id": "conv-4"})
    assert r.status_code == 204 and r.content == b""
    fake.release(1)  # the next chunk is where the producer sees the stop
    assert stream.rest().count(b"data: ") <= 1
    assert fake.cancelled == [fake.submitted[0].id]
    assert client.simulate_get("/v1/stream", params={"conv_id": "conv-4"}).status_code == 404
    assert lookup(client, "conv-4") == []
    # idempotent
    assert client.simulate_delete("/v1/stream", params={"conv_id": "conv-4"}).status_code == 204


def test_a_new_request_on_the_conversation_ends_the_previous_stream(make):
    client, fake = make(completion("a", "b", "c"), release="manual")
    fake.release(1)
    old = open_stream(client, "/completion", COMPLETION, fake=fake, headers={HEADER: "conv-5"})
    assert old.next_chunk()
    fake.release(4)  # the rest of the first request's events, then the second's first one
    new = open_stream(client, "/completion", COMPLETION, fake=fake, headers={HEADER: "conv-5"})
    assert new.status_code == 200
    fake.release_all()
    assert b'"stop":true' not in old.rest()  # cut short: no final result
    assert b'"stop":true' in new.rest()
    assert len(lookup(client, "conv-5")) == 1


def test_requests_that_do_not_stream_leave_nothing_behind(make):
    client, fake = make(completion("a", "b"))
    r = client.simulate_post("/completion", json={**COMPLETION, "stream": False}, headers={HEADER: "conv-6"})
    assert r.status_code == 200 and lookup(client, "conv-6") == []
    r = client.simulate_post("/completion", json={**COMPLETION, "n_predict": "many"}, headers={HEADER: "conv-6"})
    assert r.status_code == 400 and lookup(client, "conv-6") == []
    r = client.simulate_post("/completion", json=COMPLETION, headers={HEADER: ""})  # empty: no session
    assert r.status_code == 200 and lookup(client, "") == []


def test_route_errors_as_upstream(make):
    client, _ = make(completion("a"))
    r = client.simulate_get("/v1/stream")
    assert r.status_code == 400 and r.json == {"error": {"code": 400, "message": "Missing conversation id in path",
                                                         "type": "invalid_request_error"}}
    assert client.simulate_delete("/v1/stream").json["error"]["message"] == "Missing conversation id in path"
    r = client.simulate_get("/v1/stream", params={"conv_id": "nope"})  # 404s all read "File Not Found"
    assert r.status_code == 404 and r.json == {"error": {"message": "File Not Found", "type": "not_found_error",
                                                         "code": 404}}
    client.simulate_post("/completion", json=COMPLETION, headers={HEADER: "conv-7"})
    r = client.simulate_get("/v1/stream", params={"conv_id": "conv-7", "from": "abc"})
    assert r.status_code == 400 and r.json["error"]["message"] == "Invalid 'from' offset"
    r = client.simulate_get("/v1/stream", params={"conv_id": "conv-7", "from": str(2**64)})
    assert r.status_code == 400
    # the lookup's own 400 has no "code"; bodies it cannot read are 400, not 500
    for raw in (b"nope", b""):
        r = client.simulate_post("/v1/streams/lookup", body=raw)
        assert r.status_code == 400 and set(r.json["error"]) == {"message", "type"}
        assert r.json["error"]["message"].startswith("invalid body: ") and r.json["error"]["type"] == "invalid_request_error"
    for body in ([], {}, {"conversation_ids": "conv-7"}, {"conversation_ids": [5, "", None]}):
        assert client.simulate_post("/v1/streams/lookup", json=body).json == []
    assert len(lookup(client, "conv-7", "conv-7")) == 2  # one entry per id asked


def test_a_reader_behind_the_kept_bytes_must_restart(make):
    client, _ = make(completion(*["word"] * 20))
    state = client.app._router.find("/v1/stream")[0].state
    state.streams.max_bytes = 256  # what the 4 MiB cap does to a very long stream
    r = client.simulate_post("/completion", json=COMPLETION, headers={HEADER: "conv-8"})
    assert len(r.content) > 256
    r2 = client.simulate_get("/v1/stream", params={"conv_id": "conv-8", "from": "0"})
    assert r2.status_code == 400 and r2.json["error"]["message"] == "Stream offset lost, please restart"
    start = len(r.content) - 256
    assert client.simulate_get("/v1/stream", params={"conv_id": "conv-8", "from": str(start)}).content == r.content[start:]


# --- a real server, a client that hangs up ----------------------------------------------------
def test_real_server_keeps_generating_after_the_client_hangs_up(server):
    host, port = "127.0.0.1", server.port
    body = json.dumps({"messages": [{"role": "user", "content": "Count from one to ten."}],
                       "max_tokens": 24, "stream": True, "temperature": 0})
    conv = f"real-{time.monotonic_ns()}::org/model"
    with socket.create_connection((host, port)) as sock:
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"x-conversation-id: {conv}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    with httpx.Client(base_url=server.base, timeout=60) as http:
        deadline = time.monotonic() + 60
        while True:
            entries = http.post("/v1/streams/lookup", json={"conversation_ids": [conv.split("::")[0]]}).json()
            assert [e["conversation_id"] for e in entries] == [conv]
            if entries[0]["is_done"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert entries[0]["is_done"]
        replay = http.get("/v1/stream", params={"conv_id": conv, "from": 0})
        assert replay.status_code == 200 and len(replay.content) == entries[0]["total_bytes"]
        frames = parse_sse(replay.content)
        assert frames[-1].data == "[DONE]"
        assert frames[-2].data["choices"][0]["finish_reason"] in ("stop", "length")
        assert http.delete("/v1/stream", params={"conv_id": conv}).status_code == 204
        assert http.get("/v1/stream", params={"conv_id": conv}).status_code == 404
