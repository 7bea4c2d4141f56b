"""Loads the compiled extension ``rankdetr._C`` once, warning once when it is missing.

Importing ``rankdetr._C`` registers the ``torch.ops.rankdetr`` operators. Without it rankdetr still
works: the layers fall back to their pure-PyTorch references (slower, same results).
"""

import functools
import importlib
import warnings

_MISSING_MESSAGE = (
    "rankdetr's compiled extension (rankdetr._C) could not be imported ({error}). Falling back to "
    "the pure-PyTorch MSDeformAttn, which is slower. Build it with "
    "`pip install --no-build-isolation -e .` from the repository root (or run `make setup`)."
)


@functools.cache
def extension_available() -> bool:
    """Return True when ``rankdetr._C`` imports; warn (once per process) when it does not."""
    import torch  # noqa: F401  (loads libc10/libtorch, which rankdetr._C links against)

    try:
        importlib.import_module("rankdetr._C")
    except ImportError as error:
        warnings.warn(_MISSING_MESSAGE.format(error=error), RuntimeWarning, stacklevel=2)
        return False
    return True


@functools.cache
def extension_has_cuda() -> bool:
    """Return True when the extension was compiled with its CUDA kernels."""
    if not extension_available():
        return False
    import torch

    return bool(torch.ops.rankdetr.cuda_compiled())
