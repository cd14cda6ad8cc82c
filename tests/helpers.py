"""Helpers shared by the test modules: where the shared data lives, independent references."""

from __future__ import annotations

from pathlib import Path

# `shared/` sits beside the checkout: <parent>/<checkout>/tests/helpers.py -> <parent>/shared
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
