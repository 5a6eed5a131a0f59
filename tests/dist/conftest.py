"""Fixtures of the distributed tests."""

import pytest


@pytest.fixture(scope="session")
def layout_root(tmp_path_factory):
    """The single-process plain and elastic reference runs (tests/dist/layouts.py), trained once for
    every layout test of the session; each test writes its own runs beside them under other names."""
    from layouts import reference_runs

    return reference_runs(tmp_path_factory.mktemp("layouts"))
