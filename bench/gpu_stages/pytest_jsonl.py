"""pytest plugin of bench/run_gpu.sh: one JSON line per test outcome, appended and flushed as each test
ends, so a stage killed at its time limit keeps the results of the tests that finished.

Enabled with ``-p bench.gpu_stages.pytest_jsonl``; writes to $FASTALIGN_GPU_JSONL (nothing when unset).
"""
import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTALIGN_GPU_JSONL")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return  # one line per test: its call, or the setup/teardown that failed or skipped it
    row = {"kind": "test", "test": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        row["reason"] = str(report.longrepr[2])
    elif report.outcome == "failed":
        row["error"] = report.longreprtext[-2000:]
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
