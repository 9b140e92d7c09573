"""Methods as llama-server's HTTP library (cpp-httplib) routes them.

- A method outside cpp-httplib's set is refused while the request line is read: 400 with an
  empty body, before CORS, the loading check or the key check (Server::parse_request_line).
- CONNECT, TRACE and PRI pass those checks but have no routes: 400, empty (Server::routing).
- HEAD is routed as GET and answered without the body.
- Any other method a route does not take is a 404 "File Not Found", as an unknown route is
  (server/errors.py): cpp-httplib keeps one table per method and has no 405.
Imports: falcon.
"""

from __future__ import annotations

import falcon

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                           "PATCH", "PRI"})  # Server::builtin_methods
UNROUTED_METHODS = frozenset({"CONNECT", "TRACE", "PRI"})


def _bad_request(resp: falcon.Response) -> None:
    resp.status = falcon.HTTP_400
    resp.data = b""
    resp.complete = True


class RequestLine:
    """The first middleware: a method cpp-httplib does not know is a bare 400."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method not in KNOWN_METHODS:
            _bad_request(resp)


class MethodRouting:
    """After CORS and auth: CONNECT/TRACE/PRI are a bare 400; HEAD runs the GET responder."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method in UNROUTED_METHODS:
            _bad_request(resp)
        elif req.method == "HEAD":
            req.method = "GET"
            req.context.head = True

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded) -> None:
        if req.context.get("head"):
            req.method = "HEAD"  # Falcon then sends the headers (Content-Length too), no body
            if resp.get_header("Accept-Ranges") is None:  # cpp-httplib adds it to every HEAD
                resp.set_header("Accept-Ranges", "bytes")
            stream = resp.stream
            if stream is not None and hasattr(stream, "close"):
                resp.stream = None
                stream.close()
