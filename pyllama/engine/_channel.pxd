# cython: language_level=3
from cpython.pythread cimport PyThread_type_lock


cdef class EventChannel:
    cdef object items              # collections.deque of what was put, in order
    cdef PyThread_type_lock lock   # held while no wake-up is pending: get() waits on it
    cdef bint signalled            # a wake-up is pending or given and not yet taken (GIL)

    cdef bint put_deferred(self, item) except -1
    cdef void wake(self) noexcept nogil
