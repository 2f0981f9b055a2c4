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
