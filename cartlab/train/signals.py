"""SIGINT/SIGTERM during training: a flag the loop checks between steps, so that a signal ends the
run after a whole step and a checkpoint instead of in the middle of one."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag checked between steps (main thread only: elsewhere
    Python cannot install handlers, and the flag stays unset)."""
    flag = {"signal": None}
    if threading_main():
        def handler(signum, frame):
            flag["signal"] = signal.Signals(signum).name

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield flag
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    else:
        yield flag


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()
