#!/usr/bin/env python
"""retina_focal: RetinaNet and the focal loss (Lin et al., 2017) as a detectron2 plugin.

detectron2 itself is not listed in install_requires: it is not on PyPI under its own
name. ``tools/install.sh`` (``make install``) installs it first, or keeps the one you have.
"""
import os
import re

from setuptools import find_packages, setup


def _version() -> str:
    init = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retina_focal", "__init__.py")
    with open(init) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _config_files() -> list:
    """Every file below retina_focal/model_zoo/configs, relative to retina_focal/model_zoo."""
    package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retina_focal", "model_zoo")
    return [
        os.path.relpath(os.path.join(root, name), package)
        for root, _, names in os.walk(os.path.join(package, "configs"))
        for name in names
    ]


setup(
    name="retina_focal",
    version=_version(),
    description="RetinaNet and the focal loss for dense object detection, as a detectron2 plugin",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    packages=find_packages(include=["retina_focal", "retina_focal.*"]),
    # The configs ship inside the package (retina_focal/model_zoo/configs; configs/ links to it),
    # so retina_focal.model_zoo finds them from any install, as detectron2's model_zoo does.
    package_data={"retina_focal.model_zoo": _config_files()},
    install_requires=[
        "torch>=1.13",
        "torchvision>=0.14",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        "opencv-python>=4.5",
        "matplotlib>=3.3",
        "numpy>=1.21",
        "tqdm>4.29",
    ],
    extras_require={
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16", "onnxscript>=0.3"],  # tools/export.py --format onnx, TEST.BACKEND onnxruntime
        "int8": ["torchao>=0.18"],  # TEST.BACKEND.NAME compiled with TEST.BACKEND.INT8 (PT2E + X86InductorQuantizer)
        "test": ["pytest>=7", "hypothesis>=6", "onnx>=1.14", "onnxruntime>=1.16", "onnxscript>=0.3", "faster-coco-eval>=1.6",
                 "torchao>=0.18"],
    },
    entry_points={"console_scripts": ["retina-focal-predict=retina_focal.predict:main"]},
)
