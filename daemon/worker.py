"""One worker thread per device: blocking driver calls in order, off the event loop, with timeouts.

The thread is a daemon thread: a driver stuck forever in a vendor call cannot keep the process from
exiting. After a timeout the supervisor abandons the worker (its thread may still be blocked) and starts a
fresh one for the reconnect, so a hung call never blocks later ones.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

_STOP = object()


class WorkerClosed(RuntimeError):
    pass


class CallTimeout(TimeoutError):
    """The call did not finish within its timeout (distinct from a TimeoutError the driver itself raised)."""


class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"qnetd-dev-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, loop, fut = item
            if fut.cancelled():
                continue
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

    async def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn()`` in the worker thread; TimeoutError if it takes longer than ``timeout``.

        If the caller is cancelled or times out, the queued call is skipped if it has not started; a call
        already running finishes in the thread and its result is dropped.
        """
        if self._closed:
            raise WorkerClosed(self.name)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put((fn, loop, fut))
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that races with
        # the result, and a cancelled caller (acquisition being stopped) would then run on forever.
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await fut
        except TimeoutError:
            if deadline.expired():
                raise CallTimeout(f"{self.name}: no result within {timeout:g} s") from None
            raise  # the driver's own TimeoutError (e.g. a socket timeout): the caller treats it as a link fault

    def close(self) -> None:
        """Let the thread finish the calls already queued (cancelled ones are skipped) and exit."""
        self._closed = True
        self._queue.put(_STOP)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
