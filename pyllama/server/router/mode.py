"""Which role this server process has: a router, or not (cli.py asks before anything loads).

Imports: `settings`, router/child.py.
"""

from __future__ import annotations

from pyllama.server.router.child import is_child
from pyllama.settings import Settings


def is_router_mode(settings: Settings) -> bool:
    """Whether these flags start a router: no model, and a models folder or preset file.

    Upstream routes whenever no model is given; pyllama then serves its bundled default model,
    so a router needs --models-dir or --models-preset too, and a child never routes.
    """
    no_model = not (settings.model or settings.hf_repo or settings.model_url or settings.docker_repo)
    return no_model and bool(settings.models_dir or settings.models_preset) and not is_child()
