"""EventChannel: the engine -> HTTP thread event queue (SimpleQueue's put / get / empty)."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from pyllama.engine import EventChannel


def test_items_come_out_in_order_and_get_times_out_when_empty():
    channel = EventChannel()
    assert channel.empty()
    for i in range(5):
        channel.put(i)
    assert not channel.empty() and channel.qsize() == 5
    assert [channel.get() for _ in range(5)] == list(range(5))
    with pytest.raises(queue.Empty):
        channel.get(block=False)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        channel.get(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    with pytest.raises(ValueError):
        channel.get(timeout=-1)


def test_a_waiting_reader_gets_every_item_another_thread_puts():
    channel = EventChannel()
    n = 20000
    got = []

    def read():
        while len(got) < n:
            got.append(channel.get(timeout=10))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(n):
        channel.put(i)
        if i % 1000 == 0:
            time.sleep(0.001)  # let the reader drain and wait again
    reader.join(20)
    assert not reader.is_alive()
    assert got == list(range(n))
    assert channel.empty()
    with pytest.raises(queue.Empty):  # no stale wake-up left behind makes get() return nothing
        channel.get(timeout=0.01)


def test_a_wake_up_given_while_the_reader_was_busy_is_not_lost_or_doubled():
    channel = EventChannel()
    channel.put("a")  # wakes no one: the reader is not waiting yet
    assert channel.get() == "a"  # taken without waiting; the wake-up is still pending
    with pytest.raises(queue.Empty):
        channel.get(timeout=0.01)  # consumes the stale wake-up, finds nothing, waits, times out
    threading.Timer(0.05, channel.put, ("b",)).start()
    assert channel.get(timeout=5) == "b"
