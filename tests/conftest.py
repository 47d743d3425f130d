"""Shared pytest setup: make the repo root importable however pytest is launched."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real commands (still run by `just test` and CI)")
