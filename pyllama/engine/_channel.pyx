# cython: language_level=3
"""EventChannel: the queue a request's events travel by, engine thread -> one consumer.

A queue.SimpleQueue wakes its consumer inside put(), while the engine thread still holds the
GIL for the rest of its step: the woken HTTP thread then sleeps a second time, on the GIL,
and is woken again when the engine's next llama_decode lets go of it (two sleeps and wakes
per streamed token, on the HTTP side's CPU). Here the engine queues an event at once but
wakes the consumer only when it has let go of the GIL (EngineCore.step: put_deferred, then
wake() inside the decode's `nogil` block), so the woken thread runs straight through.

Any thread may put(); one thread gets. Items keep their order whatever the wake-ups do.
"""

import collections
import queue

from cpython.pythread cimport (
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
    WAIT_LOCK,
)
from libc.math cimport INFINITY

import time


cdef extern from "pythread.h":
    ctypedef enum PyLockStatus:
        PY_LOCK_FAILURE
        PY_LOCK_ACQUIRED
        PY_LOCK_INTR
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil


cdef class EventChannel:
    """A FIFO with queue.SimpleQueue's put / get / empty, and a wake-up the engine may defer."""

    def __cinit__(self):
        self.items = collections.deque()
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError("cannot allocate a lock")
        PyThread_acquire_lock(self.lock, WAIT_LOCK)  # nothing pending yet
        self.signalled = False

    def __dealloc__(self):
        if self.lock != NULL:
            if not self.signalled:
                PyThread_release_lock(self.lock)  # as CPython's lock_dealloc: never free it held
            PyThread_free_lock(self.lock)
            self.lock = NULL

    def put(self, item) -> None:
        """Queue `item` and wake the consumer. Any thread."""
        self.items.append(item)
        if not self.signalled:
            self.signalled = True
            PyThread_release_lock(self.lock)

    cdef bint put_deferred(self, item) except -1:
        # Engine thread, GIL held: queue `item`; True when the caller owes one wake() (made
        # without the GIL, soon: a consumer already waiting sleeps until then).
        self.items.append(item)
        if self.signalled:
            return False
        self.signalled = True
        return True

    cdef void wake(self) noexcept nogil:
        PyThread_release_lock(self.lock)

    def get(self, bint block=True, timeout=None):
        """The next item, waiting for one (at most `timeout` seconds) unless block is False.

        Raises:
            queue.Empty: nothing came in time.
        """
        cdef long long wait_us
        cdef PyLockStatus status
        cdef double deadline = INFINITY
        if timeout is not None:
            if timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            deadline = time.monotonic() + timeout
        while not self.items:
            if not block:
                raise queue.Empty
            if timeout is None:
                wait_us = -1
            else:
                wait_us = <long long>max(0.0, (deadline - time.monotonic()) * 1e6)
            with nogil:
                status = PyThread_acquire_lock_timed(self.lock, wait_us, 0)
            if status != PY_LOCK_ACQUIRED:
                if not self.items:
                    raise queue.Empty
                break
            self.signalled = False
        return self.items.popleft()

    def empty(self) -> bool:
        return not self.items

    def qsize(self) -> int:
        return len(self.items)
