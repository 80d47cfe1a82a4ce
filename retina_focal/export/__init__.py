"""Deployment: the network as a ``torch.export`` program or ONNX (``torch_export.py``), and the
inference backends that run it (``backends.py``: eager, compiled, onnxruntime)."""
from retina_focal.export.torch_export import *  # noqa: F401,F403
from retina_focal.export.torch_export import __all__  # noqa: F401
