"""Checkpoints that survive crashes and say what is wrong with the weights they load.

``RetinaFocalCheckpointer`` is detectron2's ``DetectionCheckpointer`` with two changes:

* every file it writes (``model_*.pth`` and ``last_checkpoint``) is written to a
  ``.partial`` file, flushed, fsync-ed and renamed over the target, so a crash or a
  pre-emption during a save never leaves ``last_checkpoint`` pointing at a truncated file;
* loading a checkpoint whose classifier was trained for another number of classes is an
  error that says so (detectron2 only logs a warning and silently trains a new classifier),
  unless ``MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER`` asks for exactly that.
"""
import os
from typing import Any, Dict, Sequence

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["RetinaFocalCheckpointer", "AtomicFile", "AttributeState"]

# The classifier's weight: (A*K, C, 3, 3) in RetinaFocalHead and detectron2's RetinaNetHead.
_CLASSIFIER_KEY = "head.cls_score.weight"
_PARTIAL_SUFFIX = ".partial"


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


class AttributeState:
    """Checkpoint plain attributes of an object (e.g. the model's EMA loss normalizer).

    ``Checkpointer.add_checkpointable(name, AttributeState(obj, ["attr"]))`` saves and
    restores ``obj.attr`` with the checkpoint, without adding keys to the model's
    state_dict (which would break loading detectron2's RetinaNet checkpoints strictly).
    """

    def __init__(self, obj: Any, names: Sequence[str]):
        self.obj = obj
        self.names = list(names)

    def state_dict(self) -> Dict[str, Any]:
        return {n: getattr(self.obj, n) for n in self.names}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name in self.names:
            if name in state:
                setattr(self.obj, name, state[name])


class RetinaFocalCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with atomic saves and a classifier-size check on load."""

    def __init__(self, model, save_dir: str = "", *, reinit_mismatched_classifier: bool = False, **kwargs):
        """
        Args:
            model, save_dir, kwargs: as ``DetectionCheckpointer``.
            reinit_mismatched_classifier (bool): load a checkpoint whose classifier has a
                different number of outputs anyway, keeping the model's new classifier.
        """
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWritePathManager(self.path_manager)
        self.reinit_mismatched_classifier = reinit_mismatched_classifier

    def _load_file(self, filename: str) -> Dict[str, Any]:
        checkpoint = super()._load_file(filename)
        self._check_classifier(checkpoint.get("model", {}), filename)
        return checkpoint

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
        raise ValueError(
            f"Checkpoint {filename}: its classifier ({_CLASSIFIER_KEY}) was trained for {sizes} "
            "(MODEL.RETINANET.NUM_CLASSES). To fine-tune from it anyway (every other weight is "
            "loaded, the classifier starts from the §3.3 prior), set "
            "MODEL.RETINA_FOCAL.REINIT_MISMATCHED_CLASSIFIER True."
        )
