"""The reliability report (TESTING.md, section 9).

The test suite proves kvstore's guarantees; this module counts what it proved.
Tests add to named figures as they go::

    from kvstore import reliability
    reliability.add("crash_states", len(states))

and at the end of every pytest run the plugin in ``tests/conftest.py`` prints
one block with every figure, and writes it as JSON when ``KVSTORE_REPORT`` names
a file.  ``python -m kvstore.reliability`` runs the suite (from a source
checkout) and exits non-zero if a test failed or a figure that must be zero is
not.  ``--long`` runs the long tier (``KVSTORE_SOAK=1``).

Figures that must be zero (a lost commit, a silently wrong read, an anomaly
under an isolation level that forbids it) are marked in ``FIGURES``; the
tests that count them fail on their own too, so the report is a summary, not
the check.

    >>> t = Tally()
    >>> t.add("canaries_planted", 2); t.add("canaries_caught", 2)
    >>> print(t.render(only_nonzero=True))
    kvstore reliability report
      acknowledged commits lost                                   0
      corruption faults: silently wrong                           0
      refused opens that changed a file                           0
      anomalies where the level forbids them                      0
      canaries caught                                           2/2
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

#: (key, label, must be zero).  The order is the report's.
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("crash_points", "crash points (I/O operations cut at)", False),
    ("crash_states", "crash states recovered and checked", False),
    ("nested_crashes", "nested crashes during recovery", False),
    ("acked_verified", "acknowledged commits verified", False),
    ("acked_lost", "acknowledged commits lost", True),
    ("io_error_points", "I/O-error points", False),
    ("sigkill_rounds", "SIGKILL rounds", False),
    ("corruption_detected", "corruption faults: detected", False),
    ("corruption_harmless", "corruption faults: harmless", False),
    ("corruption_silent", "corruption faults: silently wrong", True),
    ("refused_open_changed_files", "refused opens that changed a file", True),
    ("hermitage_cases", "Hermitage cases", False),
    ("histories", "isolation histories checked", False),
    ("history_txns", "transactions in checked histories", False),
    ("history_anomalies", "anomalies where the level forbids them", True),
    ("stateful_steps", "stateful-machine steps", False),
    ("canaries_planted", "canaries planted", False),
    ("canaries_caught", "canaries caught", False),
)
KNOWN = {key for key, _, _ in FIGURES}
MUST_BE_ZERO = tuple(key for key, _, zero in FIGURES if zero)


class Tally:
    """Thread-safe named counters."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        if key not in KNOWN:
            raise ValueError(f"unknown reliability figure {key!r}; known: {', '.join(sorted(KNOWN))}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"a figure grows by an int >= 0, not {n!r}")
        with self._mu:
            self.counts[key] = self.counts.get(key, 0) + n

    def failures(self) -> list[str]:
        """What is wrong with the figures: a must-be-zero figure that is not,
        or a canary planted and not caught."""
        c = self.counts
        bad = [f"{key} = {c[key]}" for key in MUST_BE_ZERO if c.get(key)]
        if c.get("canaries_caught", 0) != c.get("canaries_planted", 0):
            bad.append(f"canaries caught {c.get('canaries_caught', 0)} of {c.get('canaries_planted', 0)}")
        return bad

    def render(self, only_nonzero: bool = False) -> str:
        c = self.counts
        lines = ["kvstore reliability report"]
        for key, label, zero in FIGURES:
            if key == "canaries_planted":
                continue
            value = c.get(key, 0)
            if key == "canaries_caught":
                if only_nonzero and not c.get("canaries_planted"):
                    continue
                text = f"{value}/{c.get('canaries_planted', 0)}"
            else:
                if only_nonzero and not value and not zero:
                    continue
                text = f"{value:,}"
            lines.append(f"  {label:<50} {text:>10}")
        for problem in self.failures():
            lines.append(f"  FAILED: {problem}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"figures": dict(sorted(self.counts.items())), "failures": self.failures()}


#: the process-wide tally the tests add to
TALLY = Tally()


def add(key: str, n: int = 1) -> None:
    """Add ``n`` to the figure ``key`` of this run's report."""
    TALLY.add(key, n)


def _source_root() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "tests", "conftest.py")):
        raise SystemExit(f"kvstore.reliability runs the test suite of a source checkout; no tests/ in {root}")
    return root


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvstore.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the long tier (KVSTORE_SOAK=1)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (e.g. -k crash)")
    args = parser.parse_args(argv)
    import pytest

    if args.long:
        os.environ["KVSTORE_SOAK"] = "1"
    os.environ.setdefault("HYPOTHESIS_PROFILE", "soak" if args.long else "ci")
    if args.json:
        os.environ["KVSTORE_REPORT"] = os.path.abspath(args.json)
    from kvstore import reliability  # the module the tests import, not __main__

    os.chdir(_source_root())  # pyproject.toml's testpaths: the tests and the doctests
    code = int(pytest.main(["-q", *args.pytest_args]))
    if code == 0 and reliability.TALLY.failures():
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
