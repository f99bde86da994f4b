"""A second stop while the demo cleans up ends nothing early: exit 130, no traceback.

Proves: a Ctrl-C, and a SIGTERM, arriving as the demo's cleanup begins (fail
point ``demo-cleaning-up``, the signal sent by the process to itself there,
after a first Ctrl-C ended the story) still let the cleanup stop every
process the demo started and remove its work directory; the demo exits 130
with its "interrupted" line and no traceback.  (The demo's stop handler
raised the second one out of the cleanup's first lines, before it ignored
stop signals: the cleanup, already marked done, never ran again, the work
directory stayed, and the demo died of the KeyboardInterrupt, -2.)  The demo
runs in a child process, since it makes itself a subreaper.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from services.process_tree import mentioning

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from tideflow.tools.demo.story import Demo

    def story(self):
        print("workdir", self.workdir, flush=True)
        self.procs.start("sleeper", ["sleep", "60", str(self.workdir)],
                         log=self.workdir / "sleeper.log", env=os.environ)
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C
        return 0

    Demo._story = story
    demo = Demo(ci=True, cluster="auto", keep=False, out=sys.stdout)
    sys.exit(demo.run())
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second", ["int", "term"])
def test_a_second_stop_as_cleanup_begins_still_cleans_up_and_exits_130(
    tmp_path: Path, second: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEFLOW_")}
    env["TIDEFLOW_FAILPOINTS"] = f"demo-cleaning-up={second}"
    env["TMPDIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50, env=env
    )
    told = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.startswith("workdir "), told
    assert "Traceback" not in result.stderr, told
    assert result.returncode == 130, told
    assert "interrupted: stopping everything the demo started" in result.stdout, told
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tideflow-")], told
    assert mentioning(str(tmp_path)) == [], told
