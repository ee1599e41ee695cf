"""Drop-in adapters that put dalle_fast's ops into other codebases.

* :mod:`dalle_fast.integrations.dalle_pytorch`: ``patch``/``unpatch``/``generate`` for DALLE-pytorch
  (``dalle_pytorch.DALLE``). Imported on demand; it needs the ``dalle-pytorch`` package only when used.
"""

import importlib

_SUBMODULES = ("dalle_pytorch",)


def __getattr__(name):  # dalle_fast.integrations.dalle_pytorch without an explicit import
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

