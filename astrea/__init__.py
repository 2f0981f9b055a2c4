"""astrea: fused kernels for Mixture-of-Experts vision-language models and the Astrea model.

``import astrea`` needs only torch: the Triton kernels load when an op first runs on
them, and the compiled extension ``astrea._C`` is optional; an op that needs a missing
part raises :class:`BackendUnavailableError` saying what is missing and how to get it.
``python -m astrea.info`` reports what is available.
"""

from astrea import ops
from astrea._backend import BACKENDS, BackendUnavailableError, backend, current_backend

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "backend", "current_backend", "ops", "__version__"]
