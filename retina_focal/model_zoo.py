"""The repository's configs by name, as detectron2's ``model_zoo.get_config_file``.

    from retina_focal import model_zoo
    path = model_zoo.get_config_file("COCO-Detection/retina_focal_R_50_FPN_1x.yaml")
    cfg = model_zoo.get_config("COCO-Detection/retina_focal_R_50_FPN_1x.yaml")  # with MODEL.RETINA_FOCAL

Names are paths below the checkout's ``configs/`` folder. The configs are not part of the
installed package: this works from a checkout and from an editable install
(``pip install -e .``, what ``make install`` does). MODEL_ZOO.md maps them to detectron2's
published RetinaNet checkpoints.
"""
import os
from typing import List

from detectron2.config import CfgNode

from .engine import load_config

__all__ = ["CONFIG_ROOT", "available_configs", "get_config_file", "get_config"]

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def available_configs() -> List[str]:
    """Every config name (``configs/``-relative path of a .yaml), sorted."""
    names = []
    for root, _, files in os.walk(CONFIG_ROOT):
        names += [os.path.relpath(os.path.join(root, f), CONFIG_ROOT) for f in files if f.endswith(".yaml")]
    return sorted(names)


def get_config_file(name: str) -> str:
    """Absolute path of ``configs/<name>``, e.g. ``"COCO-Detection/retina_focal_R_50_FPN_1x.yaml"``.

    Raises:
        FileNotFoundError: no such config (the message lists the available names) or no
            ``configs/`` folder (a non-editable install).
    """
    if not os.path.isdir(CONFIG_ROOT):
        raise FileNotFoundError(
            f"retina_focal.model_zoo: no configs folder at {CONFIG_ROOT}; the configs ship with the "
            "checkout, so install with `pip install -e .` (make install) from it"
        )
    path = os.path.join(CONFIG_ROOT, name)
    if not name.endswith(".yaml") or not os.path.isfile(path):
        raise FileNotFoundError(
            f"retina_focal.model_zoo: no config {name!r} in {CONFIG_ROOT}; available: {', '.join(available_configs())}"
        )
    return path


def get_config(name: str) -> CfgNode:
    """detectron2's defaults + ``MODEL.RETINA_FOCAL`` + ``configs/<name>`` (not frozen)."""
    return load_config(get_config_file(name))
