"""Named failpoints: places where a test can make the engine fail on purpose.

The engine calls ``failpoint("wal.after_append")`` at each dangerous moment.
Unarmed (the normal case) the call is one dictionary lookup on an empty dict.
A test arms a point with an action; the action runs when the point is reached:

    >>> from wal.failpoints import arm, disarm_all, failpoint, hits
    >>> def boom():
    ...     raise RuntimeError("boom")
    >>> arm("example.point", boom, after=1)   # skip one hit, then fire
    >>> failpoint("example.point")
    >>> failpoint("example.point")
    Traceback (most recent call last):
    RuntimeError: boom
    >>> hits("example.point")
    2
    >>> disarm_all()

Child processes (the SIGKILL loops) arm points through the environment:
``KVSTORE_FAILPOINTS="wal.after_append=kill@3,pages.before_meta_fsync=kill@1"``
kills the process with SIGKILL on the 3rd hit of the first point and the 1st
hit of the second.  ``load_from_environment()`` reads the variable; it runs on
import.

This module lives in ``wal`` because that is the lowest layer: every layer
above may import it, none below needs to.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

__all__ = ["failpoint", "arm", "disarm", "disarm_all", "hits", "armed", "load_from_environment"]

_lock = threading.Lock()
_armed: dict[str, _Arm] = {}  # guarded by _lock for writes; read without it
_hits: dict[str, int] = {}  # counts hits of armed points only


class _Arm:
    __slots__ = ("action", "after", "times", "seen")

    def __init__(self, action: Callable[[], None], after: int, times: int | None) -> None:
        self.action = action
        self.after = after
        self.times = times
        self.seen = 0


def failpoint(name: str) -> None:
    """Reach the failpoint ``name``; run its action if a test armed it."""
    if not _armed:
        return
    arm_ = _armed.get(name)
    if arm_ is None:
        return
    with _lock:
        arm_.seen += 1
        _hits[name] = _hits.get(name, 0) + 1
        fire = arm_.seen > arm_.after and (arm_.times is None or arm_.seen - arm_.after <= arm_.times)
    if fire:
        arm_.action()


def arm(name: str, action: Callable[[], None], *, after: int = 0, times: int | None = None) -> None:
    """Arm ``name``: skip its first ``after`` hits, then run ``action`` on each
    hit (at most ``times`` times when given)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"failpoint name must be a non-empty str, not {name!r}")
    if after < 0:
        raise ValueError(f"after must be >= 0, got {after}")
    with _lock:
        _armed[name] = _Arm(action, after, times)
        _hits[name] = 0


def disarm(name: str) -> None:
    """Disarm ``name`` (no error if it was not armed)."""
    with _lock:
        _armed.pop(name, None)


def disarm_all() -> None:
    """Disarm every failpoint and forget the hit counts."""
    with _lock:
        _armed.clear()
        _hits.clear()


def hits(name: str) -> int:
    """How often the armed point ``name`` was reached since it was armed."""
    return _hits.get(name, 0)


def armed() -> list[str]:
    """Names of the armed points."""
    return sorted(_armed)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def load_from_environment(value: str | None = None) -> None:
    """Arm the points named in ``KVSTORE_FAILPOINTS`` (``name=kill@n,...``).

    Raises ValueError naming the bad entry if the variable is malformed.
    """
    if value is None:
        value = os.environ.get("KVSTORE_FAILPOINTS", "")
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, sep, spec = entry.partition("=")
        action, at, count = spec.partition("@")
        if not name or not sep or action != "kill" or not at or not count.isdigit() or int(count) < 1:
            raise ValueError(f"KVSTORE_FAILPOINTS entry {entry!r}: expected name=kill@N with N >= 1")
        arm(name, _kill, after=int(count) - 1, times=1)


load_from_environment()
