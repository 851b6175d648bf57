"""`make test` runs two pytest-xdist workers (`--dist loadgroup`); tests/conftest.py keeps the tests
that share a module-scoped fixture on one worker. pytest 9.2 broke this without an error
(pytest-xdist issue #1386): the grouping must be seen to work, or CI time grows unnoticed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tests_sharing_a_module_fixture_run_on_one_worker_the_others_on_any():
    module = "tests/expert/test_train_data.py"  # module-scoped `tokenizer` and `rows`, and tests without
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                           "no:cacheprovider", module], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED (\S+)", proc.stdout)
    grouped = {worker for worker, test in ran if test.endswith("@tests.expert.test_train_data")}
    assert len(grouped) == 1, ran  # the fixture's tests: one worker
    assert len([test for _, test in ran if "@" in test]) >= 5, ran
    assert any("@" not in test for _, test in ran), ran  # the tests without one are not grouped


def test_modules_with_a_slow_test_are_collected_first_and_whole():
    fast, slow = "tests/expert/test_eval_packing.py", "tests/flows/test_server.py"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", fast,
                           slow], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    order = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    assert order[0] == slow and order[-1] == fast, order
    assert order == sorted(order, key=lambda path: path != slow), order  # each module's tests together
