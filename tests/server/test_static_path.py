"""--path DIR (LLAMA_ARG_STATIC_PATH) and --media-path DIR, as llama-server has them.

Static files as cpp-httplib serves its mount point (Server::handle_file_request): index.html
at `/`, extension content types, a 301 for folders, weak ETags and 304s, ranges, files that
shadow routes, and its traversal guards: `..` above the root (plain or percent-encoded), a
backslash, a symlink out of the folder (403). Checked against a real server (gunicorn's request
parsing) and over the app.
"""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from pyllama.flags import FlagError, parse_server_args
from pyllama.server.static import is_valid_path, parse_ranges, resolve_ranges

from .conftest import ServerProcess
from .fake_engine import fake_app


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "public").mkdir()
    pub = root / "public"
    (pub / "index.html").write_text("<h1>hi</h1>\n")
    (pub / "a.css").write_text("body{}\n")
    (pub / "app.js").write_text("1;\n")
    (pub / "blob.xyz").write_bytes(b"\x00\x01data")
    (pub / "sub").mkdir()
    (pub / "sub" / "index.html").write_text("sub\n")
    (pub / "props").write_text("a file named like a route\n")
    (root / "secret.txt").write_text("secret\n")
    os.symlink(root / "secret.txt", pub / "link.txt")
    os.symlink(pub / "a.css", pub / "inside.css")
    return pub


@pytest.fixture(scope="module")
def static_server(site, gemma_path):
    srv = ServerProcess(["-m", str(gemma_path), "-np", "1", "-c", "1024", "--path", str(site)])
    srv.wait_ready()
    yield srv
    srv.stop()


def raw_get(srv, target: str) -> bytes:
    """A request line sent as written (no client-side path normalisation)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_files_types_and_index(static_server):
    with httpx.Client(base_url=static_server.base) as http:
        r = http.get("/")
        assert r.status_code == 200 and r.text == "<h1>hi</h1>\n" and r.headers["content-type"] == "text/html"
        assert http.get("/index.html").content == r.content
        assert http.get("/a.css").headers["content-type"] == "text/css"
        assert http.get("/app.js").headers["content-type"] == "text/javascript"
        assert http.get("/blob.xyz").headers["content-type"] == "application/octet-stream"
        assert http.get("/blob.xyz").content == b"\x00\x01data"
        r = http.get("/sub")
        assert r.status_code == 301 and r.headers["location"] == "/sub/"
        assert http.get("/sub/").text == "sub\n"
        assert http.get("/inside.css").text == "body{}\n"  # a symlink inside the folder is fine
        # a file shadows the route of the same name, as the mount is tried before the routes
        assert http.get("/props").text == "a file named like a route\n"
        assert http.post("/completion", json={"prompt": "x", "n_predict": 1}).status_code == 200
        assert http.get("/nothere.txt").json()["error"]["message"] == "File Not Found"
        assert http.get("/health").json() == {"status": "ok"}


def test_traversal_is_refused(static_server):
    for target in ("/../secret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt", "/%2E%2E%2Fsecret.txt",
                   "/sub/%2e%2e/%2e%2e/secret.txt", "/a%5c..%5csecret.txt", "//../secret.txt"):
        head, _, body = raw_get(static_server, target).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404"), target
        assert b"secret" not in body
    head, _, body = raw_get(static_server, "/link.txt").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403") and body == b""  # a symlink out of the folder
    assert raw_get(static_server, "/.").startswith(b"HTTP/1.1 403")  # the folder itself, resolved
    # `..` that stays inside is fine, encoded slashes included
    for target in ("/sub/../a.css", "/sub%2f..%2fa.css"):
        assert raw_get(static_server, target).endswith(b"\r\n\r\nbody{}\n"), target


def test_validators_and_ranges(static_server):
    with httpx.Client(base_url=static_server.base) as http:
        r = http.get("/a.css")
        tag = r.headers["etag"]
        assert tag.startswith('W/"') and r.headers["last-modified"].endswith(" GMT")
        assert http.get("/a.css", headers={"If-None-Match": tag}).status_code == 304
        assert http.get("/a.css", headers={"If-None-Match": "*"}).status_code == 304
        assert http.get("/a.css", headers={"If-None-Match": '"other"'}).status_code == 200
        assert http.get("/a.css", headers={"If-Modified-Since": r.headers["last-modified"]}).status_code == 304
        r = http.get("/a.css", headers={"Range": "bytes=0-1"})
        assert r.status_code == 206 and r.content == b"bo" and r.headers["content-range"] == "bytes 0-1/7"
        assert http.get("/a.css", headers={"Range": "bytes=-2"}).content == b"}\n"
        assert http.get("/a.css", headers={"Range": "bytes=10-20"}).status_code == 416
        r = http.get("/a.css", headers={"Range": "bytes=0-1,3-4"})
        assert r.status_code == 206 and r.headers["content-type"].startswith("multipart/byteranges; boundary=")
        assert b"Content-Range: bytes 3-4/7\r\n\r\ny{\r\n" in r.content
        assert http.get("/a.css", headers={"Range": "bytes=0-1", "If-Range": tag}).status_code == 200  # weak
        r = http.head("/a.css")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "7"
        sw = http.get("/sw.js")
        assert sw.headers["content-type"] == "application/javascript" and "unregister" in sw.text


def test_path_helpers_as_cpp_httplib():
    assert is_valid_path("/a/../b") and is_valid_path("/./a") and is_valid_path("/")
    assert not is_valid_path("/../a") and not is_valid_path("/a/../../b") and not is_valid_path("/a\\b")
    assert not is_valid_path("/a\0b")
    assert parse_ranges("bytes=0-1,5-") == [(0, 1), (5, -1)]
    assert parse_ranges("bytes=-") is None and parse_ranges("bytes=2-1") is None and parse_ranges("items=1-2") is None
    assert resolve_ranges([(0, 1), (1, 3)], 10) == [(0, 3)]
    assert resolve_ranges([(20, -1)], 10) is None and resolve_ranges([(-1, 4)], 10) == [(6, 9)]


def test_over_the_app_with_a_prefix_and_with_the_ui_off(synthetic_path, site):
    client, _ = fake_app(synthetic_path, args=["--path", str(site), "--api-prefix", "/api"])
    assert client.simulate_get("/api/").text == "<h1>hi</h1>\n"
    assert client.simulate_get("/api/a.css").text == "body{}\n"
    assert client.simulate_get("/a.css").status_code == 404
    client, _ = fake_app(synthetic_path, args=["--path", str(site), "--no-ui"])  # upstream: no mount
    assert client.simulate_get("/a.css").status_code == 404


def test_api_key_and_loading_apply_to_static_files(synthetic_path, site):
    client, _ = fake_app(synthetic_path, args=["--path", str(site), "--api-key", "k"])
    assert client.simulate_get("/a.css").status_code == 401
    assert client.simulate_get("/a.css", headers={"Authorization": "Bearer k"}).text == "body{}\n"
    assert client.simulate_get("/").status_code == 200  # "/" is public upstream


def test_flags(tmp_path):
    with pytest.raises(FlagError, match="static assets path not found"):
        parse_server_args(["--path", str(tmp_path / "missing")], environ={})
    assert parse_server_args(["--path", str(tmp_path / "missing"), "--no-ui"], environ={}).path
    assert parse_server_args([], environ={"LLAMA_ARG_STATIC_PATH": str(tmp_path)}).path == str(tmp_path)
    with pytest.raises(FlagError, match=r'"--media-path": not a directory: '):
        parse_server_args(["--media-path", str(tmp_path / "missing")], environ={})
    (tmp_path / "f").write_text("")
    with pytest.raises(FlagError, match="not a directory"):
        parse_server_args(["--media-path", str(tmp_path / "f")], environ={})
    assert parse_server_args(["--media-path", str(tmp_path)], environ={}).media_path == str(tmp_path) + os.sep
    logs = tmp_path / "a" / "b"
    assert parse_server_args(["--log-prompts-dir", str(logs)], environ={}).log_prompts_dir == str(logs)
    assert logs.is_dir()
