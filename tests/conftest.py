import os
import sys

from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pages.redo  # noqa: E402  (after ROOT is on the path)

# Every test checks each node a structure change installs as built against
# the decoding of the image it logged (what restart would install).
pages.redo.CHECK_BUILT = True

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "soak", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "soak" if os.environ.get("KVSTORE_SOAK") else "dev"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The reliability report (TESTING.md section 9): one block of figures
    at the end of every run, and JSON in $KVSTORE_REPORT if set."""
    from kvstore import reliability

    tally = reliability.TALLY
    if not tally.counts:
        return
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(tally.render())
    path = os.environ.get("KVSTORE_REPORT")
    if path:
        import json

        with open(path, "w") as f:
            json.dump(tally.as_json(), f, indent=2)
            f.write("\n")
