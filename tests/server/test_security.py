"""API keys, CORS, TLS and body limits on real server processes."""

from __future__ import annotations

import ssl
import subprocess

import httpx
import pytest

from .conftest import ServerProcess


@pytest.fixture(scope="module")
def keyed_server(synthetic_path, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("# comment\n\nkey-from-file\n")
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "512", "--api-key", "k1,k2",
                         "--api-key-file", str(keyfile), "--max-body-mb", "1"])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.mark.parametrize("path,method", [("/health", "GET"), ("/v1/health", "GET")])
def test_public_endpoints_need_no_key(keyed_server, path, method):
    assert httpx.request(method, keyed_server.base + path).status_code == 200


@pytest.mark.parametrize("path,method,body", [
    ("/models", "GET", None), ("/v1/models", "GET", None), ("/props", "GET", None), ("/slots", "GET", None),
    ("/completion", "POST", {"prompt": "x", "n_predict": 1}),
    ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    ("/tokenize", "POST", {"content": "x"}),
])
def test_key_matrix(keyed_server, path, method, body):
    url = keyed_server.base + path
    none = httpx.request(method, url, json=body)
    assert none.status_code == 401
    assert none.json() == {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    wrong = httpx.request(method, url, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    for headers in ({"Authorization": "Bearer k1"}, {"Authorization": "k2"},
                    {"X-Api-Key": "key-from-file"}, {"Authorization": "Bearer key-from-file"}):
        assert httpx.request(method, url, json=body, headers=headers).status_code == 200, headers


def test_openai_client_with_key(keyed_server):
    from openai import AuthenticationError, OpenAI

    ok = OpenAI(base_url=keyed_server.base + "/v1", api_key="k1")
    assert ok.completions.create(model="x", prompt="Hello", max_tokens=2).choices
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed_server.base + "/v1", api_key="bad").models.list()


def test_cors_and_preflight(keyed_server):
    r = httpx.options(keyed_server.base + "/completion", headers={"Origin": "http://example.com"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://example.com"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(keyed_server.base + "/health", headers={"Origin": "http://example.com"})
    assert r.headers["access-control-allow-origin"] == "http://example.com"


def test_body_over_the_limit_is_413(keyed_server):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(keyed_server.base + "/completion", content=big, headers={"Authorization": "k1"})
    assert r.status_code == 413
    assert httpx.get(keyed_server.base + "/health").status_code == 200


def test_tls_with_a_self_signed_certificate(synthetic_path, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--ssl-key-file", str(key),
                         "--ssl-cert-file", str(cert)], scheme="https")
    context = ssl.create_default_context(cafile=str(cert))
    try:
        srv.wait_ready(verify=context)
        r = httpx.post(srv.base + "/completion", json={"prompt": "Hello", "n_predict": 2, "ignore_eos": True},
                       verify=context)
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from a TLS port
            httpx.get(srv.base.replace("https", "http") + "/health", timeout=5).raise_for_status()
    finally:
        srv.stop()


def test_cors_localhost_origins(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--cors-origins", "localhost",
                         "--cors-methods", "GET, POST"])
    try:
        srv.wait_ready()
        local = httpx.get(srv.base + "/health", headers={"Origin": "http://localhost:3000"})
        assert local.headers["access-control-allow-origin"] == "http://localhost:3000"
        remote = httpx.get(srv.base + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in remote.headers
        pre = httpx.options(srv.base + "/completion", headers={"Origin": "http://127.0.0.1:1"})
        assert pre.headers["access-control-allow-methods"] == "GET, POST"
    finally:
        srv.stop()
