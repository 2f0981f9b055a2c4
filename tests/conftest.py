"""Test set-up. Without a GPU, the Triton kernels run on CPU tensors through the Triton
interpreter; TRITON_INTERPRET must be set before triton is first imported, so here."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import astrea  # noqa: E402  (after TRITON_INTERPRET)

try:
    from hypothesis import settings
except ImportError:  # hypothesis comes with the test extra; only tests/test_fuzz.py needs it
    settings = None
if settings is not None:
    # Reproducible fuzzing, on CI too: examples derived from each test's name, not from a random
    # seed or a database of earlier failures; no per-example deadline (the first call of an op
    # includes its dispatch set-up); 200 examples unless a test says otherwise (tests/test_fuzz.py).
    settings.register_profile("astrea", derandomize=True, deadline=None, database=None, max_examples=200,
                              print_blob=False)
    settings.load_profile("astrea")


def pytest_addoption(parser):
    parser.addoption(
        "--cuda-build",
        action="store_true",
        help="also run the full FORCE_CUDA=1 build of astrea._C against the CUDA torch (slow, ~6 GB venv)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cuda-build"):
        return
    skip = pytest.mark.skip(reason="full CUDA build check: opt in with --cuda-build")
    for item in items:
        if "cuda_build" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def kernels():
    """Forces the kernels (Triton, or _C) for the ops called inside the test."""
    with astrea.backend("triton"):
        yield


@pytest.fixture(params=("triton", "cpu"))
def kernel(request):
    """Runs the test on each kernel in turn, the Triton kernels and the C++ CPU kernels, as
    :func:`implementation` does."""
    from tests.utils import running

    with running(request.param, *getattr(request.module, "OPS_UNDER_TEST", ())):
        yield request.param


@pytest.fixture
def implementation(request):
    """The one way a test picks what runs its ops: parametrize ``implementation`` (indirect)
    with names of :data:`tests.utils.IMPLEMENTATIONS`; the test body, backward included, runs
    on it (:func:`tests.utils.running`), checked for the ops in the module's ``OPS_UNDER_TEST``."""
    from tests.utils import running

    with running(request.param, *getattr(request.module, "OPS_UNDER_TEST", ())):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
