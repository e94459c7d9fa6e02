"""The suite's own guard: no child process the tests start outlives the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import leftover_children
from tests.jobs import wait_until


class TestLeftoverChildren:
    def test_a_running_ledger_child_is_listed_until_it_ends(self) -> None:
        """A ``ledger`` child still running is what the session-end check names; once it ended, it is not."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "ledger-probe"])
        try:
            wait_until(lambda: child.pid in dict(leftover_children()), what="the child to be listed")
            assert "ledger-probe" in dict(leftover_children())[child.pid]
        finally:
            child.kill()
            child.wait(timeout=60)
        assert child.pid not in dict(leftover_children())

    def test_an_orphan_naming_the_session_directory_is_listed(self, tmp_path: Path) -> None:
        """A job's child left behind by a killed parent (any name) is found by the session path it was given."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(tmp_path / "ready")])
        try:
            wait_until(lambda: child.pid in dict(leftover_children([tmp_path])), what="the child to be listed")
        finally:
            child.kill()
            child.wait(timeout=60)
        assert child.pid not in dict(leftover_children([tmp_path]))
