"""Every program in examples/ runs, exits 0 and prints what it demonstrates.

Each example is run as a new user would run it -- ``python examples/X.py
[DIR]`` in a subprocess with this interpreter -- with a fresh temporary
directory as DIR when it takes one ("[DIR]" on its "Run:" line).  The
examples check their own claims with assertions (a failure exits non-zero);
this test also requires the key lines of their output below, and that they
leave nothing behind in DIR.  A new example must add its lines to EXPECTED.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))

#: example -> regular expressions that must each match a line of its output
EXPECTED = {
    "quickstart.py": [
        r"^snapshot sees banana = 5$",
        r"^apple restocked to 13$",
        r"^apple = 13$",
        r"^banana = 6$",
        r"^cherry = 7$",
    ],
    "bank.py": [
        r"^5 accounts with 1000 each: total 5000$",
        r"^4 threads ran 200 transfers with db\.run in [\d.]+ s$",
        r"^retries after ConflictError: \d+ \(db\.stats\(\) counts \d+ conflicts\)$",
        r"^the auditor summed all accounts \d+ times while transfers ran; totals seen: \[5000\]$",
        r"^total after: 5000$",
        r"^total after reopening: 5000$",
        r"^OK: the total never changed$",
    ],
    "inventory.py": [
        r"^isolation=\"snapshot\":$",
        r"^  result: A=2 B=2, total 4 -- below the minimum 6: write skew!$",
        r"^isolation=\"serializable\":$",
        # the loser's retry may begin before the winner's commit is visible
        # and be rolled back again: "attempt N", "retried it N times"
        r"^  clerk [12], attempt \d+: sees A=[25] B=[25]; taking 3 would leave 4 < 6: refuses$",
        r"^  clerk [12]: rolled back with ConflictError, db\.run retried it (once|\d+ times)$",
        r"^  result: A=[25] B=[25], total 7 -- rule kept$",
        r"^OK: write skew happens under snapshot isolation and is prevented under serializable$",
    ],
    "two_phase_commit.py": [
        r"^  coordinator: logged decision: xfer-1 commit$",
        r"^  coordinator: crashing now \(SIGKILL\)$",
        r"^  the coordinator was killed \(exit status -9\)$",
        r"^  bank-a in doubt: \['xfer-2'\], bank-b in doubt: \['xfer-1', 'xfer-2'\]$",
        r"^  and writing bob raises ConflictError",
        r"^  bank-b: xfer-1 is in doubt; the log says commit -> committed$",
        r"^  bank-a: xfer-2 is in doubt; no decision in the log -> rolled back$",
        r"^  bank-b: xfer-2 is in doubt; no decision in the log -> rolled back$",
        r"^after recovery: bank-a \{'alice': 400, 'carol': 300\}, bank-b \{'bob': 200, 'dave': 200\}; total 1100$",
        r"^OK: xfer-1 happened in both banks, xfer-2 in neither$",
    ],
    "backup_restore.py": [
        r"^backup written while the writer ran: \d+ pages, \d+ bytes of log$",
        r"^the writer had committed \d+ orders when the backup started, \d+ when it returned$",
        r"^opening ran recovery in [\d.]+ ms, undoing \d+ unfinished transaction\(s\)$",
        r"^db\.check\(\): ok, \d+ pages, \d+ keys, \d+ log records checked$",
        r"^restored: order-count = (\d+), \1 order keys, draft present: False$",
        r"^OK: the backup is a consistent copy as of the moment it was taken$",
    ],
    "crash_demo.py": [
        r"^writer killed with SIGKILL after acknowledging \d+ commits",
        r"^  recovery_seconds +[\d.]+$",
        r"^  recovery_transactions_undone +[12]$",  # the draft (and the commit in flight, if its writes reached the log)
        r"^acknowledged and lost: 0$",
        r"^keys of the never-committed transaction visible: 0$",
        r"^OK: every acknowledged commit survived the crash, nothing uncommitted is visible$",
    ],
}


def run_example(path: str, workdir: str) -> subprocess.CompletedProcess:
    with open(path) as f:
        takes_dir = "[DIR]" in f.read()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, path] + ([workdir] if takes_dir else []),
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs_and_shows_what_it_claims(path: str, tmp_path) -> None:
    name = os.path.basename(path)
    assert name in EXPECTED, f"examples/{name} has no expected output in tests/test_examples.py EXPECTED"
    proc = run_example(path, str(tmp_path))
    shown = f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"examples/{name} exited with status {proc.returncode}\n{shown}"
    for pattern in EXPECTED[name]:
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"examples/{name}: no line matches {pattern!r}\n{shown}"
    assert os.listdir(tmp_path) == [], f"examples/{name} left files behind: {os.listdir(tmp_path)}"


def test_every_example_is_checked() -> None:
    names = {os.path.basename(p) for p in EXAMPLES}
    assert "quickstart.py" in names
    assert set(EXPECTED) <= names, f"EXPECTED names examples that do not exist: {sorted(set(EXPECTED) - names)}"
