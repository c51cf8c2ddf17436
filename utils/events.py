"""The Socket.IO channel: which async mode this process runs under.

The app stays free of eventlet-only code: the mode follows whatever the server process has
monkey-patched (gunicorn's eventlet or gevent worker), else plain threads (`python app.py`).
"""

from __future__ import annotations

import sys


def detect_async_mode() -> str:
    """"eventlet" or "gevent" when that library has patched the socket module, else "threading"."""
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("socket"):
        return "eventlet"
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "gevent"
    return "threading"
