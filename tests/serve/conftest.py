from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    import hetero

    return hetero.load("synthetic:tiny")


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    from hetero.serve.app import create_app
    from .helpers import Server

    with Server(create_app(tiny_model, max_concurrency=2, max_queue=8)) as srv:
        yield srv
