"""Set-up shared by tests/ and benchmarks/.

The repository's kernels/ folder (installed as astrea.kernels) is also a top-level package
``kernels`` whenever the repository root is on sys.path, as pytest puts it there. Hugging
Face's ``kernels`` distribution, which transformers imports when it is installed, would then
resolve to that folder and fail. Import the installed distribution first, with the root out
of the path, so that ``kernels`` means it for the whole session."""

import importlib
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _import_installed_kernels() -> None:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if Path(entry or ".").resolve() != ROOT]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


_import_installed_kernels()
