"""Drop-in adapters that put dalle_fast's ops into other codebases.

* :mod:`dalle_fast.integrations.dalle_pytorch`: ``patch``/``unpatch``/``generate`` for DALLE-pytorch
  (``dalle_pytorch.DALLE``). Imported on demand; it needs the ``dalle-pytorch`` package only when used.
"""
