"""Server loops in daemon threads: one way to start them, wait until bound, and surface start-up errors.

Used by the in-process transport of tests (agents, entries) and by the controller's own loops
(registry, control API), so a loop that fails to bind raises in the caller instead of hanging it.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable


def start_in_thread(run: Callable[[], None], ready: threading.Event, name: str,
                    timeout_s: float = 10.0) -> threading.Thread:
    """Run `run` in a daemon thread and wait until it sets `ready` (or dies); re-raise its error."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            ready.set()

    th = threading.Thread(target=target, name=name, daemon=True)
    th.start()
    ready.wait(timeout_s)
    if errors:
        raise errors[0]
    return th


def stop_on_signals(stop: Callable[[], None]) -> None:
    """Process entries (`coel agent`, `coel entry`, `coel client`): call `stop` on SIGTERM or SIGINT."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


class ThreadedLoop:
    """A loop object with `_run()` that sets `self.ready` once bound and records `self.error`
    on a start-up failure; `start()` runs it in a daemon thread, `stop()` asks it to end."""

    thread_name = "loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        self.ready.wait(10)
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
