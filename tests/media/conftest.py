"""Relay tests that go through ``RelayWorker`` run on both of its paths (``relay_path``)."""

from __future__ import annotations

import pytest

from media_relay import fastpath


@pytest.fixture(params=["native", "python"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``native``: the C fast path (must be built); ``python``: ``EDGE_MEDIA_FASTPATH=0``."""
    path = str(request.param)
    if path == "native":
        assert fastpath.built(), "media_relay._fastpath is not built: pip install -e . (gcc, python3-dev)"
    monkeypatch.setenv(fastpath.ENV_VAR, "1" if path == "native" else "0")
    return path
