"""The dashboard page (public: what it shows without a key follows the public endpoints)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def dashboard() -> Any:
    return render_template("dashboard.html")
