"""The --models-max queue of the router (upstream's server_lru_sched in server-models.cpp).

Requests for a model that is not running wait in line here while the least recently used idle
model is stopped to make room for them. Every method needs the registry's lock held.
Imports: stdlib only (the registry is passed in).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("pyllama.server.router.models")


class LruScheduler:
    """server_lru_sched: requests waiting for a --models-max slot, and whom to evict for them.
    Every method needs the registry's lock held."""

    def __init__(self, models: "ServerModels") -> None:
        self.models = models
        self.queue: list = []  # [model_id, n_waiters, loading]

    def _count_running(self) -> int:
        return sum(1 for inst in self.models.mapping.values() if inst.meta.is_running())

    def has_capacity(self) -> bool:
        mx = self.models.models_max
        return mx <= 0 or self._count_running() < mx

    def _find(self, model_id: str):
        return next((e for e in self.queue if e[0] == model_id), None)

    def pick_victim(self) -> str:
        """The least recently used idle model, "" if none can be given up."""
        victim, victim_last_used = "", 0
        for name, inst in self.models.mapping.items():
            # a busy model is mid-request, one still coming up has no request to finish
            if inst.req_count != 0 or not inst.meta.is_ready_or_sleep():
                continue
            # already on its way out, or a queued request wants it
            if name in self.models.stopping or self._find(name):
                continue
            if not victim or inst.meta.last_used < victim_last_used:
                victim, victim_last_used = name, inst.meta.last_used
        return victim

    def join(self, model_id: str) -> None:
        entry = self._find(model_id)
        if entry:
            entry[1] += 1
            logger.info("request for name=%s joined the queue, %d waiting", model_id, entry[1])
            return
        self.queue.append([model_id, 1, False])
        logger.info("request for name=%s queued at position %d", model_id, len(self.queue))

    def leave(self, model_id: str) -> None:
        entry = self._find(model_id)
        if entry:
            entry[1] -= 1
            if entry[1] <= 0:
                self.queue.remove(entry)

    def try_claim(self, model_id: str) -> bool:
        """True if it is this model's turn to load, and nobody is loading it yet."""
        if not self.queue or self.queue[0][0] != model_id or self.queue[0][2]:
            return False
        if not self.has_capacity():
            return False
        self.queue[0][2] = True
        return True

    def claim_done(self, model_id: str, ok: bool) -> None:
        if ok:
            return
        entry = self._find(model_id)
        if entry:
            entry[2] = False

    def tick(self) -> None:
        """Evict idle models while queued requests outnumber the free slots; never blocks."""
        mx = self.models.models_max
        if mx <= 0 or not self.queue:
            return
        mapping = self.models.mapping
        n_running = n_stopping = 0
        for name, inst in mapping.items():
            if inst.meta.is_running():
                n_running += 1
                n_stopping += name in self.models.stopping
        n_needed = n_claimed = 0
        for model_id, _, loading in self.queue:
            if not loading:
                n_needed += 1
            elif model_id in mapping and not mapping[model_id].meta.is_running():
                n_claimed += 1  # claimed the slot, but load() has not spawned yet
        n_free = mx - n_running + n_stopping - n_claimed
        while n_free < n_needed:
            victim = self.pick_victim()
            if not victim:
                return  # all remaining models are busy: wait for a request to end
            logger.info("evicting idle LRU name=%s for a queued request", victim)
            self.models.request_stop(victim)
            n_free += 1
