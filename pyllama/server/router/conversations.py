"""Which model serves each conversation's resumable stream (server_models::conv_model_tracker).

Imports: stdlib only.
"""

from __future__ import annotations

import threading


class ConvModelTracker:
    """conv_model_tracker: which model serves each conversation's resumable stream.

    Filled when a POST carrying X-Conversation-Id is relayed, so that /v1/stream and
    /v1/streams/lookup go straight to the child that holds the session. Best effort: a stale
    entry only makes that child answer "not found". Each registration gets a ticket; a stop
    (DELETE /v1/stream) or a newer request on the same conversation invalidates it, which is
    how a request still waiting for its model to load is cancelled. Thread-safe: a lock of its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_ticket = 1
        self._map: dict = {}  # conv_id -> (model, ticket)

    def remember(self, conv_id: str, model: str) -> int:
        """Register; the ticket, or 0 when nothing was registered."""
        if not conv_id or not model:
            return 0
        with self._lock:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._map[conv_id] = (model, ticket)
            return ticket

    def alive(self, conv_id: str, ticket: int) -> bool:
        """False once a stop erased the entry or a newer request replaced it."""
        with self._lock:
            entry = self._map.get(conv_id)
            return entry is not None and entry[1] == ticket

    def lookup(self, conv_id: str) -> str | None:
        if not conv_id:
            return None
        with self._lock:
            entry = self._map.get(conv_id)
            return None if entry is None else entry[0]

    def forget(self, conv_id: str) -> None:
        with self._lock:
            self._map.pop(conv_id, None)
