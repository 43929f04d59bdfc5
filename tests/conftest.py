"""Shared fixtures: an isolated cache dir per session, bf16 decode activations, GPU skipping."""
from __future__ import annotations

import os

import pytest

# The numerics tests check kernels against exact sums with x in bf16 or fp32, so the suite runs decode
# with bf16 activations (subprocesses too, through the environment). The int8 default is tested on its
# own (tests/ops/test_blocks_i8.py: its loops, batch equality, the default and the switch).
os.environ["HETERO_DECODE_ACT"] = "bf16"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tests never write into the user's cache; the built-in tokenizer cache is rebuilt once per run.
    if "HETERO_CACHE" not in os.environ or os.environ.get("HETERO_TEST_KEEP_CACHE") != "1":
        os.environ["HETERO_CACHE"] = str(tmp_path_factory.mktemp("hetero-cache"))
    yield


@pytest.fixture(autouse=True)
def _bf16_decode_acts():
    # a test that switches the mode (an int8_mode fixture, a benchmark helper) leaves it switched
    yield
    from hetero.ops import kernels

    if kernels.get() is not None:
        kernels.set_decode_act("bf16")


@pytest.fixture(autouse=True)
def _restore_threads():
    # An in-process CLI call with --threads N sets torch's thread count for the whole process; left
    # set, every later test runs at N threads and finds the cached hardware profile (measured at the
    # default count) stale, so it is measured again (~40 s each time).
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
