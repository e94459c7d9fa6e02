"""The layout is the architecture: the import contracts in pyproject.toml hold, and the job side
installs and runs without the service."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TestImportContracts:
    def test_lint_imports_keeps_every_contract(self) -> None:
        """import-linter finds the core pure, the job side free of the service, and the layers kept."""
        lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
        assert lint is not None, "import-linter is part of the test extra"
        done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert 0 == done.returncode, done.stdout + done.stderr
        assert "3 kept, 0 broken" in done.stdout

    def test_core_modules_import_nothing_of_io(self) -> None:
        """Importing the whole core loads neither NATS, SQLite, the HTTP server nor the CLI."""
        code = ("import sys; import ledger.core.events, ledger.core.machine, ledger.core.fold, "
                "ledger.core.decide, ledger.core.shapes; "
                "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
                "{'nats', 'aiosqlite', 'sqlite3', 'litestar', 'uvicorn', 'click', 'rich', 'projections'}); "
                "print(','.join(bad))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert "" == done.stdout.strip()


class TestTypes:
    def test_mypy_is_clean(self) -> None:
        """mypy finds no error in ledger/ and projections/ (a match over events that misses a type is one)."""
        done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(ROOT / ".mypy_cache")],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-2000:]
