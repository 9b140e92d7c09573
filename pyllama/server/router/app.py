"""The router's HTTP side: its own routes, the proxied ones, and the gunicorn application.

As server.cpp wires router mode (server_models_routes::init_routes): /health as usual; GET
/props is the router's own answer unless `?model=` names a model; GET /models and /v1/models
list every model with its state (`?reload=` re-scans the sources first); POST /models downloads
a model into the cache, DELETE /models removes one; POST /models/load and /models/unload; GET
/models/sse streams the registry's events; /v1/stream and /v1/streams/lookup reach the child
holding a conversation's session (router/streams.py); every other model route is proxied to the
child serving the model that the request names, in its JSON body's `model` (POST; a multipart
form's `model` field, the form relayed as it came) or its `model` query parameter (GET),
loading it first unless autoload is off (`--no-models-autoload`, or `?autoload=false`).
Errors are upstream's: a std::invalid_argument there is a 400 invalid_request_error here, a
std::runtime_error a 500 server_error, any 404 the usual "File Not Found".
Imports: `errors`, `settings`, falcon, gunicorn, the server's middleware and error modules
(none of which import the engine) and the router package: the router never loads libllama.
"""

from __future__ import annotations

import email.policy
import logging
import os
import queue
import signal
import threading
import time
from email.parser import BytesParser

import falcon
import orjson

from pyllama.errors import InvalidRequestError, NotFoundError
from pyllama.server import errors as server_errors
from pyllama.server.connection import ConnectionWatch
from pyllama.server.headers import UpstreamHeaders
from pyllama.server.middleware import BadJSONError, CorsAndAuth, JSONBody
from pyllama.server.resources.features import DisabledFeatureResource
from pyllama.server.routing import MethodRouting, RequestLine
from pyllama.server.router import preset as presets
from pyllama.server.router.cache import check_repo_name
from pyllama.server.router.models import (CHILD_ADDR, DOWNLOADING, MODE_DOWNLOAD, SOURCE_CACHE, ModelMeta,
                                          ServerModels)
from pyllama.server.router.proxy import forward
from pyllama.server.router.streams import RouterStreamResource, RouterStreamsLookupResource
from pyllama.settings import Settings

logger = logging.getLogger(__name__)

# NOTE(router): the pinned llama.cpp's build, as llama_build_info() gives it (vendor/pin.toml);
# the router cannot ask libllama, which it never loads
LLAMA_BUILD_NUMBER = 11312
LLAMA_BUILD_COMMIT = "0c1e57098"


class RouterState:
    """What the router's resources share: settings, the model registry, the stop flag."""

    def __init__(self, settings: Settings, models: ServerModels) -> None:
        self.settings = settings
        self.models = models
        self.ready = threading.Event()  # CorsAndAuth's loading check: a router is ready at once
        self.ready.set()
        self.stopping = threading.Event()  # disconnects /models/sse clients at shutdown


def _autoload(state: RouterState, req: falcon.Request) -> bool:
    """is_autoload: `?autoload=` if given, else --models-autoload."""
    value = req.get_param("autoload") or ""
    if not value:
        return state.settings.models_autoload
    return value in ("true", "1")


def _validate_model(state: RouterState, name: str, autoload: bool) -> str:
    """router_validate_model: the canonical name of the model a request names."""
    if not name:
        raise InvalidRequestError("model name is missing from the request")
    meta = state.models.get_meta(name)
    if meta is None:
        raise InvalidRequestError(f"model '{name}' not found")
    if not autoload and not meta.is_running():
        raise InvalidRequestError("model is not loaded")
    return meta.name


def _body_json(req: falcon.Request):
    """The request's JSON body; a multipart form's fields as an object (cpp-httplib turns a
    form into JSON for the handler, and proxy_post reads `model` from it)."""
    raw = req.context.raw_body or b""
    if (req.content_type or "").lower().startswith("multipart/form-data"):
        return _form_fields(req.content_type, raw)
    try:
        return orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:  # json::parse throws: a 500 through ex_wrapper
        raise BadJSONError(f"[json.exception.parse_error.101] parse error: {exc}") from None


def _form_fields(content_type: str, raw: bytes) -> dict:
    """The text fields of a multipart/form-data body (its files are left out)."""
    msg = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields = {}
    if msg.is_multipart():
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name and not part.get_filename():
                fields[name] = part.get_payload(decode=True).decode("utf-8", "replace")
    return fields


def _proxy(state: RouterState, req: falcon.Request, resp: falcon.Response, name: str, autoload: bool,
           update_last_used: bool) -> None:
    """Make sure the model runs, then relay the request to its child (proxy_get/proxy_post).

    A POST carrying X-Conversation-Id is remembered as served by this model (the stream
    routes find its session there) before the load wait, so that a DELETE /v1/stream during
    that wait cancels it; such a request does not give up when its client leaves during the
    wait (only a stop cancels it: the child's session buffer must still get the generation).
    """
    models = state.models
    should_stop = resp.context.get("client_gone")
    conv_id = (req.get_header("X-Conversation-Id") or "") if req.method == "POST" else ""
    ticket = models.conv_models.remember(conv_id, name)
    if autoload:
        models.ensure_model_ready(name, should_stop if ticket == 0 else None)
    if ticket and not models.conv_models.alive(conv_id, ticket):
        logger.info("request for conv_id=%s cancelled while model name=%s was loading", conv_id, name)
        raise InvalidRequestError("request cancelled by a stop while the model was loading")
    meta = models.begin_request(name, update_last_used)
    logger.info("proxying request to model %s on port %d", meta.name, meta.port)
    path = req.path + ("?" + req.query_string if req.query_string else "")
    relay(state, resp, meta.port, req.method, path, dict(req.headers), req.context.get("raw_body") or b"",
          on_close=lambda: models.end_request(meta.name))


def relay(state: RouterState, resp: falcon.Response, port: int, method: str, path: str, headers: dict,
          body: bytes, on_close=None) -> None:
    """Send a request to the child on `port` and answer with what it answers (server_http_proxy);
    `on_close` runs once the answer has been relayed."""
    out = forward(method, CHILD_ADDR, port, path, headers, body, state.settings.timeout, on_close=on_close)
    resp.status = out.status
    for key, value in out.headers:
        if key.lower() != "date":  # gunicorn writes its own
            resp.append_header(key, value)
    if out.content_type:
        resp.content_type = out.content_type
    if out.body is not None:
        resp.stream = out.body
    else:
        resp.data = out.data


class ProxyResource:
    """A model route, relayed to the child of the model the request names (proxy_get /
    proxy_post). Also takes a path parameter (POST /slots/{id_slot})."""

    json_body = "raw"  # forwarded as it came

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def on_get(self, req, resp, **params):
        name = req.get_param("model") or ""
        autoload = _autoload(self.state, req)
        name = _validate_model(self.state, name, autoload)
        _proxy(self.state, req, resp, name, autoload, update_last_used=False)

    def on_post(self, req, resp, **params):
        body = _body_json(req)
        name = body.get("model") if isinstance(body, dict) else None
        autoload = _autoload(self.state, req)
        name = _validate_model(self.state, name if isinstance(name, str) else "", autoload)
        _proxy(self.state, req, resp, name, autoload, update_last_used=True)  # POST: the model is used


class HealthResource:
    """GET /health: the router is up (routes.get_health, unchanged in router mode)."""

    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class PropsResource(ProxyResource):
    """GET /props: the router's own, or a model's with `?model=` (get_router_props)."""

    def on_get(self, req, resp, **params):
        if req.get_param("model"):
            return super().on_get(req, resp)
        s = self.state.settings
        resp.media = {
            "role": "router",
            "max_instances": s.models_max,
            "models_autoload": s.models_autoload,
            # a dummy answer so that UIs written for a single model do not break
            "model_alias": "llama-server",
            "model_path": "none",
            "default_generation_settings": {"params": {}, "n_ctx": 0},
            "ui_settings": orjson.loads(s.ui_config) if s.ui_config else {},
            "build_info": f"b{LLAMA_BUILD_NUMBER}-{LLAMA_BUILD_COMMIT}",
            "cors_proxy_enabled": False,  # pyllama has no --ui-mcp-proxy
        }


class ModelsResource:
    """GET /models, /v1/models: every model and its state (get_router_models), the sources
    re-scanned first with `?reload=` (any value)."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def on_get(self, req, resp):
        if req.get_param("reload"):
            self.state.models.load_models()
        now = int(time.time())
        data = []
        for meta in self.state.models.get_all_meta():
            if meta.hidden:
                continue  # a cache model a preset deduplicates
            status = {"value": meta.status, "args": list(meta.args)}
            if meta.preset.name:  # a download's entry has none
                shown = meta.preset.copy()
                presets.unset_reserved_args(shown, False)
                for env in ("LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_ALIAS", "LLAMA_ARG_TAGS"):
                    shown.unset_option(env)
                status["preset"] = shown.to_ini()
            if meta.is_failed():
                status["exit_code"] = meta.exit_code
                status["failed"] = True
            info = {
                "id": meta.name, "aliases": sorted(meta.aliases), "tags": sorted(meta.tags),
                "object": "model", "owned_by": "llamacpp", "created": now, "status": status,
                # NOTE(router): pyllama has no multimodal input, so text only
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": meta.source, "can_remove": meta.source == "cache",
            }
            if meta.is_running():  # what the child's /v1/models said, for what is not here
                for key, value in (meta.loaded_info or {}).items():
                    info.setdefault(key, value)
            data.append(info)
        resp.media = {"data": data, "object": "list"}


class ModelsManageResource(ModelsResource):
    """/models: the list, and the cache: POST {"model": "user/repo[:quant]"} downloads a model
    into the cache in a child of its own (post_router_models); DELETE ?model= stops a cache
    model and deletes its files (del_router_models)."""

    json_body = "any"

    def on_post(self, req, resp):
        body = req.context.body
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("model must be a non-empty string")
        # NOTE(router): upstream also lists the repo on the hub here, but goes on whatever the
        # listing says; only a malformed name stops it, and the download child reports the rest
        check_repo_name(name)
        models = self.state.models
        if models.has_model(name):
            raise InvalidRequestError(f"model '{name}' already exists")
        logger.info("starting download for model '%s'", name)
        models.load(name, MODE_DOWNLOAD, ModelMeta(name=name, preset=presets.Preset(), source=SOURCE_CACHE))
        resp.media = {"success": True}

    def on_delete(self, req, resp):
        name = req.get_param("model") or ""
        if not name:
            raise InvalidRequestError("model must be a non-empty string")
        self.state.models.remove(name)
        resp.media = {"success": True}


class ModelsLoadResource:
    """POST /models/load {"model"}: start a model (post_router_models_load)."""

    json_body = "any"

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = req.context.body
        name = body.get("model") if isinstance(body, dict) else None
        meta = self.state.models.get_meta(name) if isinstance(name, str) else None
        if meta is None:
            raise NotFoundError("model is not found")
        if meta.is_running():
            raise InvalidRequestError("model is already running")
        self.state.models.load(meta.name)
        resp.media = {"success": True}


class ModelsUnloadResource:
    """POST /models/unload {"model"}: stop a model (post_router_models_unload)."""

    json_body = "any"

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = req.context.body
        name = body.get("model") if isinstance(body, dict) else None
        meta = self.state.models.get_meta(name) if isinstance(name, str) else None
        if meta is None:
            raise InvalidRequestError("model is not found")
        if not meta.is_running() and meta.status != DOWNLOADING:
            raise InvalidRequestError("model is not running")
        self.state.models.unload(meta.name)
        resp.media = {"success": True}


class ModelsEventsResource:
    """GET /models/sse: the registry's events, one `data: {...}` each (get_router_models_sse)."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    def on_get(self, req, resp):
        resp.status = falcon.HTTP_200
        resp.content_type = "text/event-stream"
        resp.stream = _Events(self.state, resp.context.get("client_gone"))


class _Events:
    """One /models/sse client: waits a second at a time, so that a client that left or the
    router stopping ends it (server_models_sse_client::next)."""

    def __init__(self, state: RouterState, client_gone) -> None:
        self.state = state
        self.client_gone = client_gone
        self.queue = state.models.sse.subscribe()
        self.started = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if not self.started:  # an empty first chunk: gunicorn sends the headers now
            self.started = True
            return b""
        while True:
            try:
                event = self.queue.get(timeout=1)
            except queue.Empty:
                if self.state.stopping.is_set() or (self.client_gone is not None and self.client_gone()):
                    self.close()
                    raise StopIteration from None
                continue
            return b"data: " + orjson.dumps(event) + b"\n\n"

    def close(self) -> None:
        self.state.models.sse.unsubscribe(self.queue)


# server.cpp's router wiring: the routes a child serves, by how the model is named
PROXY_POST = ("/props", "/completion", "/completions", "/v1/completions", "/chat/completions",
              "/v1/chat/completions", "/v1/chat/completions/control", "/v1/responses", "/responses",
              "/v1/audio/transcriptions", "/audio/transcriptions", "/v1/messages", "/v1/messages/count_tokens",
              "/infill", "/embedding", "/embeddings", "/v1/embeddings", "/rerank", "/reranking", "/v1/rerank",
              "/v1/reranking", "/tokenize", "/detokenize", "/apply-template", "/chat/completions/input_tokens",
              "/v1/chat/completions/input_tokens", "/responses/input_tokens", "/v1/responses/input_tokens",
              "/lora-adapters", "/slots/{id_slot}")
PROXY_GET = ("/metrics", "/lora-adapters", "/slots")


def create_router_app(state: RouterState) -> falcon.App:
    """The router's WSGI app over its state."""
    s = state.settings
    app = falcon.App(middleware=[RequestLine(), CorsAndAuth(state), MethodRouting(),
                                 JSONBody(s.max_body_mb << 20), ConnectionWatch()], cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.keep_blank_qs_values = True
    app.resp_options.default_media_type = "application/json; charset=utf-8"
    server_errors.register(app)
    prefix = s.api_prefix.rstrip("/")
    proxy = ProxyResource(state)
    health = HealthResource()
    routes = {"/health": health, "/v1/health": health, "/props": PropsResource(state),
              "/models": ModelsManageResource(state), "/v1/models": ModelsResource(state),
              "/v1/stream": RouterStreamResource(state, relay),  # GET replays, DELETE stops
              "/v1/streams/lookup": RouterStreamsLookupResource(state),
              "/models/load": ModelsLoadResource(state), "/models/unload": ModelsUnloadResource(state),
              "/models/sse": ModelsEventsResource(state)}
    for path in PROXY_POST + PROXY_GET:
        routes.setdefault(path, proxy)
    disabled = DisabledFeatureResource()  # no --ui-mcp-proxy, --tools, MCP servers: 403
    routes.update({"/cors-proxy": disabled, "/tools": disabled})
    for path, resource in routes.items():
        app.add_route(prefix + path, resource)
    return app


# --- gunicorn ---------------------------------------------------------------------------------
def _chain_stop_signals(state: RouterState) -> None:
    """Set the stop flag when the worker is told to stop, before gunicorn's own handler
    (shutdown_handler: "important to disconnect any SSE clients")."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            state.stopping.set()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def build_router_app(state: RouterState):
    """In the worker: the app, the stop signals, and the `load-on-startup` models."""
    if threading.current_thread() is threading.main_thread():
        _chain_stop_signals(state)
    try:
        state.models.load_startup_models()
    except Exception as exc:  # noqa: BLE001 - upstream: "failed to load models on startup", exit 1
        logger.critical("failed to load models on startup: %s", exc)
        os._exit(3)  # gunicorn's WORKER_BOOT_ERROR: the arbiter stops instead of respawning
    return UpstreamHeaders(create_router_app(state))


def worker_exit_hook(state: RouterState):
    """gunicorn's worker_exit for a router: disconnect /models/sse clients, then stop every
    child and wait for them (the router's clean_up)."""
    def worker_exit(server, worker):
        state.stopping.set()
        # each child gets its stop-timeout, then is killed: wait a little longer than the longest
        state.models.unload_all(timeout=state.models.max_stop_timeout() + 5)

    return worker_exit


def announce(settings: Settings) -> None:
    from pyllama.server.gunicorn import bind_addresses

    logger.info("starting server in router mode. models will be automatically loaded on-demand")
    logger.info("pyllama-server listening on %s", ", ".join(bind_addresses(settings)))
    logger.warning("security: router mode enabled - do not expose to untrusted environments")


def run(settings: Settings, argv: list) -> int:
    """Serve in router mode until stopped; every child is stopped before this returns."""
    from pyllama.server.gunicorn import PyllamaApplication

    try:
        models = ServerModels(settings, argv)
    except Exception as exc:  # noqa: BLE001 - a bad preset, folder or name: upstream returns 1
        logger.error("failed to initialize router models: %s", exc)
        return 1
    state = RouterState(settings, models)
    worker_exit = worker_exit_hook(state)

    class RouterApplication(PyllamaApplication):
        def load_config(self):
            super().load_config()
            self.cfg.set("worker_exit", worker_exit)

        def load(self):
            return build_router_app(state)

    announce(settings)
    RouterApplication(settings).run()
    return 0
