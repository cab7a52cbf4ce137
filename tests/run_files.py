"""Run every test file in a pytest process of its own, then print one closing line.

In one long pytest session XLA's compiler crashed (SIGSEGV, then SIGABRT, inside
``backend_compile_and_load``) in tests/test_problems.py after ~200 earlier tests, with or without
torch imported, while the file passes alone: some state accumulates across compilations. Until
the cause is found, each file gets a fresh process (a few seconds of start-up each).

    python tests/run_files.py [pytest options]
"""

import re
import subprocess
import sys
from pathlib import Path

totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
status = 0
for path in sorted(Path(__file__).parent.glob("test_*.py")):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *sys.argv[1:], str(path)],
        capture_output=True,
        text=True,
    )
    sys.stdout.write(result.stdout[-6000:] if result.returncode == 0 else result.stdout + result.stderr[-4000:])
    sys.stdout.flush()
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary):
        totals["error" if kind.startswith("error") else kind] += int(count)
    if result.returncode not in (0, 5):  # 5: no tests collected
        status = 1
        totals["failed"] += 0 if re.search(r"\d+ (failed|errors?)", summary) else 1  # a crash counts as one
print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed, {totals['skipped']} skipped")
sys.exit(status)
