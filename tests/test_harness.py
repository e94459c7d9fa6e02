"""The suite's own guard: no child process the tests start outlives the suite."""

from __future__ import annotations

import subprocess
import sys

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
