from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_engine():
    """synthetic:tiny planned and loaded as `hetero serve synthetic:tiny` does (no flags)."""
    from hetero.commands.serve import load_engine

    engine, _ = load_engine("synthetic:tiny", progress=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    from hetero.serve.app import create_app
    from .helpers import Server

    with Server(create_app(tiny_engine, max_concurrency=2, max_queue=8)) as srv:
        yield srv
