"""The upstream pool's request slots: bounded waits, first come first served, no slot lost.

`Slots` replaced asyncio.Semaphore on the hot path (an uncontended take is one comparison);
these pin the semaphore behaviour the pool relies on, including the races a cancellation or
a timeout can meet at the moment a slot is handed over.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.forwarding.pool import PoolExhausted, Slots


async def test_free_slots_are_taken_without_waiting_then_waits_time_out() -> None:
    slots = Slots(2)
    assert slots.take() and slots.take()
    assert not slots.take()
    started = time.monotonic()
    with pytest.raises(PoolExhausted):
        await slots.wait(0.2)
    assert 0.15 < time.monotonic() - started < 2
    slots.release()
    assert slots.take()  # the timed-out waiter left no claim behind


async def test_a_released_slot_goes_to_the_oldest_waiter_not_a_newcomer() -> None:
    slots = Slots(1)
    assert slots.take()
    served: list[str] = []

    async def waiter(name: str) -> None:
        await slots.wait(5)
        served.append(name)

    first = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    slots.release()
    assert not slots.take()  # handed over, not freed: a newcomer cannot overtake
    await first
    assert served == ["first"]
    slots.release()
    await second
    assert served == ["first", "second"]
    slots.release()
    assert slots.take()


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    slots = Slots(1)
    assert slots.take()
    doomed = asyncio.create_task(slots.wait(5))
    await asyncio.sleep(0)
    patient = asyncio.create_task(slots.wait(5))
    await asyncio.sleep(0)
    slots.release()  # handed to `doomed`, which has not run yet
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(patient, 1)  # the slot went on to the next in line
    slots.release()
    assert slots.take()
    assert not slots.take()


async def test_a_slot_handed_over_as_the_wait_times_out_is_kept() -> None:
    slots = Slots(1)
    assert slots.take()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(slots.wait(0.05))
    await asyncio.sleep(0)
    # Hand the slot over in the same loop turn as the timeout fires.
    loop.call_at(loop.time() + 0.05, slots.release)
    try:
        await waiting
        kept = True
    except PoolExhausted:
        kept = False
    if kept:
        assert not slots.take()  # the waiter owns it
        slots.release()
    assert slots.take()  # either way exactly one slot exists again
    assert not slots.take()


async def test_cancelled_waiters_leave_the_line() -> None:
    slots = Slots(1)
    assert slots.take()
    gone = [asyncio.create_task(slots.wait(5)) for _ in range(3)]
    await asyncio.sleep(0)
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    slots.release()
    assert slots.take()  # no cancelled waiter swallowed the slot
