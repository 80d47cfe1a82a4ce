"""Checkpoints that survive crashes and say what is wrong with the weights they load.

``RetinaFocalCheckpointer`` is detectron2's ``DetectionCheckpointer`` with two changes:

* every file it writes (``model_*.pth`` and ``last_checkpoint``) is written to a
  ``.partial`` file, flushed, fsync-ed and renamed over the target, so a crash or a
  pre-emption during a save never leaves ``last_checkpoint`` pointing at a truncated file;
* loading a checkpoint whose classifier was trained for another number of classes is an
  error that says so (detectron2 only logs a warning and silently trains a new classifier),
  unless ``MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER`` asks for exactly that;
* a file that cannot be read (truncated, corrupt) is an error naming it and the previous
  checkpoint beside it; for inference (``for_inference=True``: ``--eval-only``, predict,
  export) weights that leave a model tensor unloaded are an error, and in training a
  one-line summary says how many were loaded.

:class:`RunFacts` records, in every checkpoint, what ``--resume`` needs unchanged to continue
a run exactly (batch, world size, schedule, datasets) and refuses a resume that changed them.
"""
import logging
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from retina_focal.checkpoint.torchvision_weights import detectron2_state_dict

__all__ = [
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
    "RetinaFocalCheckpointer",
    "AtomicFile",
    "check_fits_torchvision_weights",
    "RunFacts",
    "load_inference_weights",
    "previous_checkpoint",
]

logger = logging.getLogger(__name__)

# The classifier's weight: (A*K, C, 3, 3) in RetinaFocalHead and detectron2's RetinaNetHead.
_CLASSIFIER_KEY = "head.cls_score.weight"
_PARTIAL_SUFFIX = ".partial"
# The loaded file's name travels to _load_model inside the checkpoint dict, under this key
# (fvcore's Checkpointer.load calls "checkpoint = self._load_file(path)" then
# "self._load_model(checkpoint)", with no file name), and is taken out there.
_SOURCE_KEY = "__retina_focal_source__"


class AtomicFile:
    """``open(path, mode)`` for writing whose content appears at ``path`` all at once.

    Data go to ``path + ".partial"``; a clean exit of the ``with`` block flushes, fsyncs
    and renames it over ``path`` (atomic on POSIX); an exception deletes it and leaves
    ``path`` as it was.
    """

    def __init__(self, path: str, mode: str):
        self.path = path
        self.partial = path + _PARTIAL_SUFFIX
        self._file = open(self.partial, mode)

    def __enter__(self):
        return self._file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._file.close()
            os.remove(self.partial)
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        _fsync_dir(os.path.dirname(self.path) or ".")


def _fsync_dir(directory: str) -> None:
    """Persist a rename: fsync the directory entry (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AtomicWritePathManager:
    """A PathManager whose ``open`` writes local files through :class:`AtomicFile`."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs):
        if any(c in mode for c in "wax") and "://" not in path:
            return AtomicFile(path, mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._path_manager, name)


_CHECKPOINT_NAME = re.compile(r"^model_(\d+)\.pth$")
_LISTED_KEYS = 5


def previous_checkpoint(path: str) -> Optional[str]:
    """The newest ``model_<iteration>.pth`` beside ``path`` that comes before it (any of them
    when ``path`` is ``model_final.pth`` or another name), or None."""
    directory, name = os.path.split(path)
    match = _CHECKPOINT_NAME.match(name)
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return None
    earlier = sorted(n for n in names if _CHECKPOINT_NAME.match(n) and (match is None or n < name))
    return os.path.join(directory, earlier[-1]) if earlier else None


_FULL_DISK_BYTES = 64 * 2**20  # less free space than this after a failed save: the disk is the cause


def _save_failure_note(path: str) -> str:
    """What to say when saving ``path`` failed: the file, the free space where it goes, and
    whether that is the cause. The previous checkpoint and last_checkpoint are untouched
    (saves are atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"while saving the checkpoint {path}"
    full = "; the disk is full: free space or move OUTPUT_DIR, then --resume" if free < _FULL_DISK_BYTES else ""
    return (f"while saving the checkpoint {path} ({free / 2**20:.0f} MiB free on its disk{full}); "
            "the previous checkpoint and last_checkpoint are unchanged")


def _first(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _LISTED_KEYS else ""
    return ", ".join(keys[:_LISTED_KEYS]) + more


class RetinaFocalCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with atomic saves, a classifier-size check and, for inference,
    a check that the weights fit the model."""

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        reinit_mismatched_classifier: bool = False,
        for_inference: bool = False,
        ema=None,
        **kwargs,
    ):
        """
        Args:
            model, save_dir, kwargs: as ``DetectionCheckpointer``.
            reinit_mismatched_classifier (bool): load a checkpoint whose classifier has a
                different number of outputs anyway, keeping the model's new classifier
                (training only).
            for_inference (bool): every tensor of the model's state dict must come from the
                checkpoint (a model with random parts would be evaluated or exported).
            ema (retina_focal.engine.ema.ModelEMA or None): save the EMA weights as "model" and the
                raw ones in the "model_ema" checkpointable (added here).
        """
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWritePathManager(self.path_manager)
        self.reinit_mismatched_classifier = reinit_mismatched_classifier and not for_inference
        self.for_inference = for_inference
        self.ema = ema
        if ema is not None:
            self.add_checkpointable("model_ema", ema)

    def save(self, name: str, **kwargs: Any) -> None:
        """Save as detectron2 does; with EMA, the checkpoint's "model" is the EMA weights
        (passed as the "model" entry: fvcore's ``save`` writes ``data["model"] =
        self.model.state_dict()``, then ``data.update(kwargs)``) and "model_ema" the raw ones."""
        if self.ema is not None:
            kwargs = {"model": self.ema.averaged_state_dict(), **kwargs}
        try:
            super().save(name, **kwargs)
        except Exception as e:  # e.g. a full disk: torch.save says only "unexpected pos ..."
            e.add_note(_save_failure_note(os.path.join(self.save_dir, f"{name}.pth")))
            raise

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:  # torch.load of a truncated or corrupt file: zip, pickle, EOF errors
            if not os.path.isfile(filename):
                raise
            raise ValueError(self._unreadable_message(filename, e)) from e
        self._check_classifier(checkpoint.get("model", {}), filename)
        checkpoint[_SOURCE_KEY] = filename
        return checkpoint

    @staticmethod
    def _unreadable_message(filename: str, error: Exception) -> str:
        message = (
            f"Checkpoint {filename} ({os.path.getsize(filename)} bytes) cannot be read: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. It is truncated or "
            "corrupt (e.g. the job died while it was being written by a tool without atomic saves)."
        )
        previous = previous_checkpoint(filename)
        if previous:
            message += (
                f" The previous checkpoint is {previous}: to resume from it, add "
                f"--resume RESUME.CHECKPOINT {os.path.basename(previous)}"
            )
        return message

    def _load_model(self, checkpoint: Any):
        source = checkpoint.pop(_SOURCE_KEY, "the checkpoint")
        _move_old_loss_normalizer(checkpoint)
        # torchvision's ImageNet weights are a start for training (a backbone only): for inference
        # they are left as they are, and the check below says that they do not fit
        torchvision = None if self.for_inference else detectron2_state_dict(checkpoint.get("model", {}))
        if torchvision is not None:
            kind, checkpoint["model"] = torchvision
            check_fits_torchvision_weights(self.model, source, kind)
            logger.info(f"{source}: torchvision {kind} weights, mapped to the backbone's names (backbone.bottom_up)")
        incompatible = super()._load_model(checkpoint)
        missing = list(incompatible.missing_keys)
        total = len(self.model.state_dict())
        if self.for_inference and missing:
            unexpected = list(incompatible.unexpected_keys)
            raise ValueError(
                f"Checkpoint {source} does not fit the model: {len(missing)} of the model's {total} tensors are "
                f"not in it ({_first(missing)})"
                + (f"; {len(unexpected)} of the checkpoint's tensors are unknown to the model ({_first(unexpected)})"
                   if unexpected else "")
                + ". Inference needs every weight: use a checkpoint trained with this config "
                "(MODEL.* keys such as MODEL.RESNETS.DEPTH, MODEL.FPN.OUT_CHANNELS must match)."
            )
        if missing:
            logger.warning(
                f"Loaded {total - len(missing)} of the model's {total} tensors from {source}; {len(missing)} keep "
                f"their initialization ({_first(missing)})"
            )
        return incompatible

    def _check_classifier(self, weights: Dict[str, Any], filename: str) -> None:
        model_weights = dict(self.model.named_parameters())
        if _CLASSIFIER_KEY not in weights or _CLASSIFIER_KEY not in model_weights:
            return
        theirs = weights[_CLASSIFIER_KEY].shape[0]
        ours = model_weights[_CLASSIFIER_KEY].shape[0]
        if theirs == ours or self.reinit_mismatched_classifier:
            return
        num_anchors = getattr(getattr(self.model, "head", None), "num_anchors", None)
        if num_anchors and theirs % num_anchors == 0:
            sizes = f"{theirs // num_anchors} classes, the model has {ours // num_anchors}"
        else:
            sizes = f"{theirs} outputs, the model's has {ours}"
        message = f"Checkpoint {filename}: its classifier ({_CLASSIFIER_KEY}) was trained for {sizes} (MODEL.RETINANET.NUM_CLASSES)."
        if self.for_inference:
            raise ValueError(f"{message} Evaluate it with the config it was trained with (its NUM_CLASSES).")
        raise ValueError(
            f"{message} To fine-tune from it anyway (every other weight is loaded, the classifier "
            "starts from the §3.3 prior), set MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER True."
        )


def _move_old_loss_normalizer(checkpoint: Dict[str, Any]) -> None:
    """Checkpoints of retina_focal before 0.2 saved RetinaFocal's loss normalizer beside the
    model (``{"loss_normalizer": {"loss_normalizer": x}}``); it is now the model's own
    state-dict entry, where this moves it."""
    old = checkpoint.pop("loss_normalizer", None)
    model = checkpoint.get("model")
    if isinstance(old, dict) and "loss_normalizer" in old and isinstance(model, dict) and "loss_normalizer" not in model:
        model["loss_normalizer"] = torch.tensor(float(old["loss_normalizer"]), dtype=torch.float64)


# torchvision's ImageNet normalization, in 0-255 pixels, RGB order (torchvision's transforms).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


def check_fits_torchvision_weights(model: nn.Module, source: str, kind: str) -> None:
    """Raise, naming the keys, when ``model`` would compute other features from torchvision
    weights (``kind``: "ResNet", "MobileNetV2") than torchvision does: a bottleneck ResNet with
    the stride in its 1x1 conv (detectron2's MSRA default; torchvision strides in the 3x3), or
    an input normalization that is not torchvision's (RGB, ImageNet mean and std)."""
    bottom_up = getattr(getattr(model, "backbone", None), "bottom_up", None)
    first = getattr(bottom_up, "res3", [None])[0]
    if first is not None and hasattr(first, "conv3") and tuple(first.conv1.stride) != (1, 1):
        raise ValueError(
            f"{source} holds torchvision {kind} weights, which stride in the 3x3 conv of a block; the model strides in "
            "the 1x1 (MODEL.RESNETS.STRIDE_IN_1X1 True, for MSRA weights): set MODEL.RESNETS.STRIDE_IN_1X1 False"
        )
    mean, std = getattr(model, "pixel_mean", None), getattr(model, "pixel_std", None)
    if mean is not None and std is not None:
        fits = torch.allclose(mean.flatten().cpu(), torch.tensor(TORCHVISION_PIXEL_MEAN), atol=1.0) and torch.allclose(
            std.flatten().cpu(), torch.tensor(TORCHVISION_PIXEL_STD), atol=1.0
        )
        if not fits:
            raise ValueError(
                f"{source} holds torchvision {kind} weights, trained on RGB images normalized by ImageNet's mean and std; "
                f"the model has MODEL.PIXEL_MEAN {[round(v, 3) for v in mean.flatten().tolist()]} and MODEL.PIXEL_STD "
                f"{[round(v, 3) for v in std.flatten().tolist()]}: set "
                f"INPUT.FORMAT RGB, MODEL.PIXEL_MEAN {list(TORCHVISION_PIXEL_MEAN)}, MODEL.PIXEL_STD {list(TORCHVISION_PIXEL_STD)}"
            )


def load_inference_weights(model: nn.Module, weights: str) -> None:
    """Load ``weights`` into ``model`` for inference (evaluation, predict, export): every
    tensor of the model must come from the file (:class:`RetinaFocalCheckpointer` with
    ``for_inference``).

    Raises:
        FileNotFoundError: ``weights`` is empty or names no file.
        ValueError: the weights do not fit the model, or the file cannot be read.
    """
    if not weights:
        raise FileNotFoundError(
            "MODEL.WEIGHTS is empty: inference needs trained weights; pass MODEL.WEIGHTS path/to/model_final.pth"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights!r}: no such file; pass MODEL.WEIGHTS path/to/model_final.pth")
    RetinaFocalCheckpointer(model, for_inference=True).load(weights)


def _plain(value: Any) -> Any:
    """Tuples (and nested ones) as lists, so values from a cfg compare equal to saved ones."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class RunFacts:
    """Checkpointable: what the data stream and the LR schedule of a run depend on.

    Saved with every checkpoint; loaded on ``--resume``, where a value that changed is an
    error naming it with its old and new value, unless ``allow_changes``
    (``RESUME.ALLOW_CHANGES``) accepts it (then logged as a warning).
    """

    def __init__(self, facts: Dict[str, Any], allow_changes: bool = False):
        """
        Args:
            facts (dict): name (a config key, or e.g. "world size") -> this run's value.
            allow_changes (bool): resume anyway when some differ.
        """
        self.facts = {k: _plain(v) for k, v in facts.items()}
        self.allow_changes = allow_changes
        self.changed: Dict[str, List[Any]] = {}

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.facts)

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.changed = {k: [saved[k], v] for k, v in self.facts.items() if k in saved and _plain(saved[k]) != v}
        if not self.changed:
            return
        changes = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in self.changed.items())
        if not self.allow_changes:
            raise ValueError(
                f"--resume cannot continue this run exactly: {changes}. The data stream and the LR schedule "
                "depend on these (detectron2 rescales IMS_PER_BATCH, BASE_LR and the schedule with --num-gpus "
                "when SOLVER.REFERENCE_WORLD_SIZE is set). Resume with the old values, or add RESUME.ALLOW_CHANGES "
                "True to continue anyway: the stream then goes on at the number of images the run has seen, and the "
                "LR follows the new schedule from the resumed iteration."
            )
        logger.warning(f"RESUME.ALLOW_CHANGES: resuming although {changes}")
