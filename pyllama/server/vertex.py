"""Google Cloud Vertex AI compatibility: AIP_MODE=PREDICTION and its variables.

As server-http.cpp's gcp_params: with AIP_MODE=PREDICTION the server listens on AIP_HTTP_PORT
(default 8080, whatever --port says, with a warning when they differ), answers the health
check on AIP_HEALTH_ROUTE too (when set) and the Vertex predict protocol on AIP_PREDICT_ROUTE
(default /predict); both get a leading `/` when they lack one, and live under --api-prefix.
https://cloud.google.com/vertex-ai/docs/predictions/custom-container-requirements
Imports: `settings`, stdlib.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from pyllama.settings import Settings

logger = logging.getLogger(__name__)


def _env(environ, name: str, default: str, leading_slash: bool = False) -> str:
    value = environ.get(name) or ""
    if not value:
        return default
    if leading_slash and not value.startswith("/"):
        value = "/" + value
    return value


def _stoi(text: str) -> int:
    """std::stoi: leading blanks, a sign and digits, the rest ignored."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    if not match or not -2**31 <= int(match.group(1)) < 2**31:
        raise ValueError(f"invalid AIP_HTTP_PORT: {text!r}")
    return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class GcpParams:
    """The AIP_* variables (gcp_params)."""

    enabled: bool = False
    path_health: str = ""  # empty: only the usual /health
    path_predict: str = "/predict"
    port: int = 8080

    @classmethod
    def from_env(cls, environ=None) -> "GcpParams":
        """Read AIP_MODE, AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE, AIP_HTTP_PORT.

        Raises:
            ValueError: AIP_HTTP_PORT is not a number (upstream's std::stoi throws).
        """
        environ = os.environ if environ is None else environ
        return cls(enabled=environ.get("AIP_MODE", "") == "PREDICTION",
                   path_health=_env(environ, "AIP_HEALTH_ROUTE", "", True),
                   path_predict=_env(environ, "AIP_PREDICT_ROUTE", "/predict", True),
                   port=_stoi(_env(environ, "AIP_HTTP_PORT", "8080")))


def apply_port(settings: Settings, environ=None) -> Settings:
    """The settings with Vertex AI's port, when AIP_MODE=PREDICTION (server_http_context::init)."""
    gcp = GcpParams.from_env(environ)
    if not gcp.enabled:
        return settings
    logger.debug("Google Cloud Platform compat: health route = %s, predict route = %s, port = %d",
                 gcp.path_health, gcp.path_predict, gcp.port)
    if settings.port != gcp.port:
        logger.warning("Google Cloud Platform compat: overriding server port %d with AIP_HTTP_PORT %d",
                       settings.port, gcp.port)
    return dataclasses.replace(settings, port=gcp.port)
