"""One function run in a thread of its own, waited on through an event.

The event, not ``Thread.join()``: on CPython 3.11, a ``join()`` interrupted by Ctrl-C
(``KeyboardInterrupt``) marks the thread as ended although it still runs, and every later
``join()`` returns at once; a wait on an event that the thread sets as it ends stays true.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["in_background"]


def in_background(target: Callable[[], object], name: str) -> threading.Event:
    """Start ``target()`` in a daemon thread called ``name``; the event is set once it has
    returned or raised (what it returns or raises is for ``target`` to keep)."""
    ended = threading.Event()

    def run() -> None:
        try:
            target()
        finally:
            ended.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    return ended
