"""The web view (CONTRACT section 8), served by the API's Litestar app.

``pages`` renders the runs, run, sweep and quarantine pages and the live
sequence events; ``actions`` holds the POST routes that change sweeps and
runs; ``listing`` the newest-first runs query; ``render`` the HTML pieces.
``static/`` is plain CSS and a small hand-written script: no build step,
nothing loaded from another origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from litestar.static_files import create_static_files_router

STATIC: Final = Path(__file__).parent / "static"


def web_routes() -> list[Any]:
    """The web view's route handlers and its static files, to mount on the API app."""
    from projections.web import actions, pages

    return [
        pages.runs_page, pages.run_page, pages.sweeps_page, pages.sweep_page, pages.quarantine_page,
        pages.seq_events, pages.login_form, pages.login, actions.sweep_action, actions.run_kill,
        create_static_files_router(path="/web/static", directories=[STATIC], include_in_schema=False,
                                   cache_control=None),
    ]
