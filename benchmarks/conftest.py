"""Benchmarks run with ``pytest benchmarks/ --benchmark-only``; see benchmarks/harness.py."""

import pytest
import torch

from benchmarks.harness import ON_GPU


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    from benchmarks.harness import environment

    return f"astrea benchmarks on {environment()['device']} ({'GPU' if ON_GPU else 'CPU'} sizes)"


# Parameters that are sides of one comparison, not cases: --headline keeps all of their values.
COMPARISON_PARAMETERS = frozenset({"provider", "mode", "backward", "op"})


def pytest_addoption(parser):
    parser.addoption("--headline", action="store_true",
                     help="only each benchmark's first case (its headline size), with every provider and mode")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--headline"):
        return
    kept, dropped, headline = [], [], {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = repr(sorted((name, value) for name, value in params.items() if name not in COMPARISON_PARAMETERS))
        # The first case collected of each benchmark function is its headline.
        first = headline.setdefault((item.path, item.originalname), case)
        (kept if case == first else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept
