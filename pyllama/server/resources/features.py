"""Routes llama-server registers for features pyllama does not have, answered as upstream
answers them when the feature is off: /cors-proxy and /tools (server.cpp's res_403 without
--ui-mcp-proxy, --tools or MCP servers)."""

from __future__ import annotations

from pyllama.errors import FeatureDisabledError


class DisabledFeatureResource:
    """GET/POST of a disabled feature: 403 feature_disabled."""

    json_body = "raw"  # upstream answers before reading the body
    sleep_bypass = ("GET", "POST")  # nothing to wake the model for (server/sleep.py)

    def on_get(self, req, resp):
        raise FeatureDisabledError("this feature is disabled")

    on_post = on_get
