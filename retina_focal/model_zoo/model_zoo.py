"""The configs by name, as detectron2's ``model_zoo.get_config_file``.

    from retina_focal import model_zoo
    path = model_zoo.get_config_file("COCO-Detection/retina_focal_R_50_FPN_1x.yaml")
    cfg = model_zoo.get_config("COCO-Detection/retina_focal_R_50_FPN_1x.yaml")  # with MODEL.RETINA_FOCAL

Names are paths below ``retina_focal/model_zoo/configs`` (package data, so they are found
from any install, editable or not; the checkout's ``configs/`` is a link to that folder).
``train_net.py --config-file`` and ``retina-focal-predict --config-file`` accept a name as
well as a path (:func:`find_config_file`). MODEL_ZOO.md maps them to detectron2's published
RetinaNet checkpoints.
"""
import os
from typing import List

from detectron2.config import CfgNode

__all__ = ["CONFIG_ROOT", "available_configs", "find_config_file", "get_config_file", "get_config"]

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CONFIG_SUFFIXES = (".yaml", ".py")  # yacs configs and LazyConfigs


def available_configs() -> List[str]:
    """Every config name (``configs/``-relative path of a .yaml or .py config), sorted."""
    names = []
    for root, _, files in os.walk(CONFIG_ROOT):
        names += [os.path.relpath(os.path.join(root, f), CONFIG_ROOT) for f in files if f.endswith(_CONFIG_SUFFIXES)]
    return sorted(names)


def get_config_file(name: str) -> str:
    """Absolute path of the config ``name``, e.g. ``"COCO-Detection/retina_focal_R_50_FPN_1x.yaml"``.

    Raises:
        FileNotFoundError: no such config (the message lists the available names).
    """
    path = os.path.join(CONFIG_ROOT, name)
    if not name.endswith(_CONFIG_SUFFIXES) or not os.path.isfile(path):
        raise FileNotFoundError(
            f"retina_focal.model_zoo: no config {name!r} in {CONFIG_ROOT}; available: {', '.join(available_configs())}"
        )
    return path


def find_config_file(path_or_name: str) -> str:
    """``path_or_name`` if it is a file, else the packaged config of that name (a path relative
    to ``configs/``, with or without a leading ``configs/``).

    Raises:
        FileNotFoundError: neither a file nor a config name; the message says both.
    """
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name[len("configs/"):] if path_or_name.startswith("configs/") else path_or_name
    if os.path.isfile(os.path.join(CONFIG_ROOT, name)) and name.endswith(_CONFIG_SUFFIXES):
        return os.path.join(CONFIG_ROOT, name)
    raise FileNotFoundError(
        f"--config-file {path_or_name!r}: no such file (from {os.getcwd()}), and no packaged config of that name; "
        f"names are relative to {CONFIG_ROOT}, e.g. {available_configs()[0]!r}"
    )


def get_config(name: str) -> CfgNode:
    """detectron2's defaults + ``MODEL.RETINA_FOCAL`` + ``configs/<name>`` (not frozen)."""
    from retina_focal.config.load import (
        load_config,  # load.py finds config names here: imported when used
    )

    return load_config(get_config_file(name))
