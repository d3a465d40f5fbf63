"""Relay tests that go through ``RelayWorker`` run on each of its paths (``relay_path``)."""

from __future__ import annotations

import pytest

from media_relay import fastpath


@pytest.fixture(params=["native", "uring", "python"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``native``: the C fast path on epoll (must be built); ``uring``: the same on io_uring
    (``EDGE_MEDIA_URING=1``; the value is ``native`` too, as the worker reports it);
    ``python``: ``EDGE_MEDIA_FASTPATH=0``."""
    path = str(request.param)
    if path != "python":
        assert fastpath.built(), "media_relay._fastpath is not built: pip install -e . (gcc, python3-dev)"
    monkeypatch.setenv(fastpath.ENV_VAR, "0" if path == "python" else "1")
    monkeypatch.setenv(fastpath.URING_ENV_VAR, "1" if path == "uring" else "0")
    return "python" if path == "python" else "native"
