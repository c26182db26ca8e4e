"""Writers killed with SIGKILL mid-write (issue 13), a handful of times; bench/crash.py --kills 200 is the
campaign. Committed cards survive whole, half-written ones are never readable, the store verifies after gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "crash.py"


def test_sigkilled_writers_lose_nothing_committed_and_leave_nothing_half_readable(tmp_path):
    out = tmp_path / "crash.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--seed", "5", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    stats = json.loads(out.read_text())
    assert stats["kills"] == 3 and stats["committed"]["cards"] > 0 and stats["committed"]["store"] > 0
    assert stats["committed_ok"] == sum(stats["committed"].values())
    assert stats["lost"] == stats["half_readable"] == stats["wrong"] == stats["foreign"] == []
    assert stats["verify_failures_after_gc"] == {} and stats["partial_left_after_gc"] == 0
