"""Inference backends: what runs RetinaFocal's network at test time (``TEST.BACKEND.*``).

The network is :class:`~retina_focal.export.ExportableRetinaFocal`: normalization, backbone,
head and anchors of one padded image. A backend replaces it; the post-processing that
follows (§4.1's threshold, top-k, decode and NMS, and the rescaling) is the model's own in
every backend (:func:`retina_focal.export.postprocess`). ``TEST.BACKEND.NAME``:

* ``eager``: the PyTorch model as it trained (the default; batches as detectron2 pads them);
* ``compiled``: ``torch.export`` + AOTInductor (C++ code generated and built for this CPU,
  weights frozen into it). H and W are dynamic, so one compilation serves every padded size
  from twice the largest feature stride (256 px for P7) to 4096 px; a size outside (the
  128-px demo) gets a program of its own. ``TEST.AMP`` is compiled into it;
* ``onnxruntime``: the ONNX export run by ONNX Runtime's CPU provider, float32, or int8 with
  ``TEST.BACKEND.INT8``: static post-training quantization (QDQ, weights per channel, int8;
  activations uint8) calibrated on ``TEST.BACKEND.CALIBRATION_IMAGES`` images of
  ``DATASETS.TRAIN``.

The compiled and ONNX backends run on the CPU (``MODEL.DEVICE cpu``), the images of a batch
one at a time (batch 1, each padded to the size divisibility only). What they build is cached
in ``TEST.BACKEND.CACHE_DIR`` (default ``OUTPUT_DIR/inference_backend``) under a key of the
weights and every setting that changes the network (:func:`network_key`), so a second run
loads it in about a second, int8 without calibrating again. Processes of a distributed
``--eval-only`` each build the programs the first time (the files are renamed into place, so
they do not clash).
Backends are registered in :data:`INFERENCE_BACKEND_REGISTRY`: a function
``(cfg, model) -> network``, where ``network(image)`` takes the padded (1, 3, H, W) float32
image and returns the ``3 * L`` outputs of ``ExportableRetinaFocal``.
"""
import hashlib
import logging
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from retina_focal.export import (
    ExportableRetinaFocal,
    export_dynamic_shapes,
    export_onnx,
    min_dynamic_side,
    padded_for_export,
    postprocess,
    serves_dynamic_shapes,
)

__all__ = [
    "INFERENCE_BACKEND_REGISTRY",
    "BackendBuildError",
    "BackendModel",
    "add_backend_argument",
    "backend_opts",
    "build_inference_model",
    "check_backend_settings",
]

logger = logging.getLogger(__name__)

INFERENCE_BACKEND_REGISTRY = Registry("RETINA_FOCAL_INFERENCE_BACKEND")
INFERENCE_BACKEND_REGISTRY.__doc__ = """Functions ``(cfg, model) -> network``; ``TEST.BACKEND.NAME`` names one by its
function name, as detectron2's registries do."""

Network = Callable[[Tensor], Sequence]


def check_backend_settings(cfg) -> None:
    """Raise ValueError, naming the keys, for backend settings that fit nothing."""
    name = cfg.TEST.BACKEND.NAME
    known = backend_names()
    if name not in known:
        raise ValueError(f"TEST.BACKEND.NAME must be one of {known}, got {name!r}")
    if name != "eager" and torch.device(cfg.MODEL.DEVICE).type != "cpu":
        raise ValueError(f"TEST.BACKEND.NAME {name} runs on the CPU; with MODEL.DEVICE {cfg.MODEL.DEVICE} use eager")
    if cfg.TEST.BACKEND.INT8 and name != "onnxruntime":
        raise ValueError(f"TEST.BACKEND.INT8 True needs TEST.BACKEND.NAME onnxruntime, got {name!r}")
    if cfg.TEST.AMP.ENABLED and name == "onnxruntime":
        raise ValueError(
            "TEST.AMP.ENABLED is for the PyTorch backends (TEST.BACKEND.NAME eager or compiled); "
            "onnxruntime runs float32, or int8 with TEST.BACKEND.INT8 True"
        )
    if cfg.TEST.BACKEND.INT8 and cfg.TEST.BACKEND.CALIBRATION_IMAGES < 1:
        raise ValueError(f"TEST.BACKEND.CALIBRATION_IMAGES must be >= 1, got {cfg.TEST.BACKEND.CALIBRATION_IMAGES}")
    if cfg.TEST.BACKEND.INT8 and not cfg.DATASETS.TRAIN:
        raise ValueError("TEST.BACKEND.INT8 calibrates on the images of DATASETS.TRAIN, which is empty")


def backend_names() -> List[str]:
    return ["eager", *sorted(name for name, _ in INFERENCE_BACKEND_REGISTRY)]


def add_backend_argument(parser) -> None:
    """``--backend NAME``: ``TEST.BACKEND.NAME NAME``; ``onnxruntime-int8`` also sets
    ``TEST.BACKEND.INT8 True``."""
    parser.add_argument(
        "--backend",
        choices=[*backend_names(), "onnxruntime-int8"],
        help="inference backend (TEST.BACKEND.NAME; onnxruntime-int8 = onnxruntime with TEST.BACKEND.INT8 True); "
        "bfloat16 for eager and compiled: TEST.AMP.ENABLED True",
    )


def backend_opts(args) -> List:
    """The config overrides of ``args.backend`` (none without ``--backend``)."""
    backend = getattr(args, "backend", None)
    if backend is None:
        return []
    if backend == "onnxruntime-int8":
        return ["TEST.BACKEND.NAME", "onnxruntime", "TEST.BACKEND.INT8", True]
    return ["TEST.BACKEND.NAME", backend]


def build_inference_model(cfg, model: nn.Module) -> nn.Module:
    """``model`` (eval mode, weights loaded) itself for the eager backend, else a
    :class:`BackendModel` whose network is ``TEST.BACKEND.NAME``'s."""
    check_backend_settings(cfg)
    if cfg.TEST.BACKEND.NAME == "eager":
        return model
    return BackendModel(model, INFERENCE_BACKEND_REGISTRY.get(cfg.TEST.BACKEND.NAME)(cfg, model.eval()))


class BackendModel(nn.Module):
    """The model's inference with its network run by a backend: the model's inputs
    (``image`` (C, H, W), optional ``height``/``width``) and outputs (``[{"instances"}]``)."""

    def __init__(self, model: nn.Module, network: Network):
        super().__init__()
        self.model = model
        self.network = network

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [{"instances": self._detections(x)} for x in batched_inputs]

    def _detections(self, x: Dict):
        image = x["image"].to(self.model.device, torch.float32)[None]  # (1, 3, H, W)
        input_size = tuple(image.shape[-2:])
        output_size = (x.get("height", input_size[0]), x.get("width", input_size[1]))
        outputs = self.network(padded_for_export(self.model, image))
        return postprocess(self.model, outputs, input_size, output_size)


# ---------------------------------------------------------------------------------- cache

# Keys of cfg.MODEL that act after the network (post-processing) or only name files: the
# cache key leaves them out, so changing a threshold or moving the weights rebuilds nothing.
_KEYS_AFTER_THE_NETWORK = (
    "WEIGHTS",
    "RETINANET.SCORE_THRESH_TEST",
    "RETINANET.TOPK_CANDIDATES_TEST",
    "RETINANET.NMS_THRESH_TEST",
    "RETINA_FOCAL.CLASS_SCORE_THRESH",
    "RETINA_FOCAL.CLASS_AGNOSTIC_NMS",
    "RETINA_FOCAL.FAST_POSTPROCESS",
)


def network_key(cfg, model: nn.Module) -> str:
    """A hash of what decides the network's outputs: the weights, the model config (less
    :data:`_KEYS_AFTER_THE_NETWORK`), the input format, ``TEST.AMP``, the versions of torch
    and onnxruntime, torch's CPU capability (the compiled code's instruction set) and, for
    int8, the calibration settings: number of images, names of the sets (not their files:
    after changing a set's images under the same name, empty the cache) and the test-time
    resize."""
    network_cfg = cfg.MODEL.clone()
    for key in _KEYS_AFTER_THE_NETWORK:
        node, leaf = network_cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        node[leaf[-1]] = None
    texts = [network_cfg.dump(), cfg.INPUT.FORMAT, cfg.TEST.AMP.dump(), torch.__version__, _onnxruntime_version(),
             torch.backends.cpu.get_cpu_capability()]
    if cfg.TEST.BACKEND.INT8:
        texts += [str(cfg.TEST.BACKEND.CALIBRATION_IMAGES), str(list(cfg.DATASETS.TRAIN)),
                  str((cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST))]
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "no onnxruntime"
    return onnxruntime.__version__


def cache_dir(cfg) -> str:
    return cfg.TEST.BACKEND.CACHE_DIR or os.path.join(cfg.OUTPUT_DIR, "inference_backend")


def cached(path: str, build: Callable[[str], None], what: str) -> str:
    """``path``, built by ``build(tmp_path)`` unless it exists; written under a temporary name
    (``.building-*``) and renamed, so an interrupted build leaves nothing that a later run would
    load."""
    if os.path.isfile(path):
        logger.info(f"{what}: loading {path}")
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".building-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    start = time.perf_counter()
    try:
        build(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info(f"{what}: built in {time.perf_counter() - start:.1f} s, cached at {path}")
    return path


def loaded(path: str, load: Callable[[str], object]):
    """``load(path)``; a file that cannot be loaded is named (delete it to rebuild)."""
    try:
        return load(path)
    except Exception as e:
        raise RuntimeError(f"cannot load the cached program {path} ({type(e).__name__}: {e}); delete it to rebuild") from e


# ------------------------------------------------------------------------- program sizes

Size = Optional[Tuple[int, int]]  # None: the dynamic-shape program; (H, W): a fixed-size one


def program_size(model: nn.Module, image: Tensor) -> Size:
    """The program that serves the padded ``image`` (1, 3, H, W): the dynamic-shape one (None)
    when both sides are in its range, else one of its own size (H, W)."""
    height, width = image.shape[-2:]
    return None if serves_dynamic_shapes(model, height, width) else (int(height), int(width))


def size_label(size: Size) -> str:
    return "dynamic" if size is None else f"{size[0]}x{size[1]}"


def example_image(model: nn.Module, size: Size) -> Tensor:
    """A blank padded (1, 3, H, W) image of ``size`` (for None, the dynamic range's smallest)."""
    height, width = size or (min_dynamic_side(model),) * 2
    return padded_for_export(model, torch.zeros(1, 3, height, width, device=model.device))


class BackendBuildError(RuntimeError):
    """A backend's program could not be built or loaded (no C++ compiler, an unwritable cache,
    an export error): the run cannot go on with this backend, whatever the image."""


class PerSizePrograms:
    """A network that builds (or loads) the program of each :func:`program_size` on first use.

    A program that fails to build raises :class:`BackendBuildError`, once: the failure is kept
    and raised again at once for every later image, not built again (a failed AOTInductor
    build takes minutes)."""

    def __init__(self, model: nn.Module, load: Callable[[Size], Network], name: str):
        self.model, self.load, self.name = model, load, name
        self.programs: Dict[Size, Network] = {}
        self.failure: Optional[BackendBuildError] = None

    def __call__(self, image: Tensor) -> Sequence:
        if self.failure is not None:
            raise self.failure
        size = program_size(self.model, image)
        if size not in self.programs:
            try:
                self.programs[size] = self.load(size)
            except Exception as e:
                self.failure = BackendBuildError(
                    f"TEST.BACKEND.NAME {self.name}: the {size_label(size)} program could not be built or loaded "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use TEST.BACKEND.NAME eager, "
                    "or fix the cause (a C++ compiler for compiled, a writable TEST.BACKEND.CACHE_DIR)"
                )
                raise self.failure from e
        return self.programs[size](image)


# ------------------------------------------------------------------------------- backends


@INFERENCE_BACKEND_REGISTRY.register()
def compiled(cfg, model: nn.Module) -> Network:
    """torch.export + AOTInductor; the packages (.pt2) cached on disk."""
    exportable, key = ExportableRetinaFocal(model), network_key(cfg, model)

    def load(size: Size) -> Network:
        def build(path: str) -> None:
            example = example_image(model, size)
            with torch.no_grad():
                program = torch.export.export(exportable, (example,), dynamic_shapes=export_dynamic_shapes(exportable, example))
                torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs={"freezing": True})

        label = size_label(size)
        path = cached(os.path.join(cache_dir(cfg), f"compiled-{key}-{label}.pt2"), build, f"compiled backend ({label})")
        return loaded(path, torch._inductor.aoti_load_package)

    return PerSizePrograms(model, load, "compiled")


@INFERENCE_BACKEND_REGISTRY.register()
def onnxruntime(cfg, model: nn.Module) -> Network:
    """ONNX Runtime's CPU provider on the ONNX export (float32, or int8 with TEST.BACKEND.INT8);
    the .onnx files cached on disk."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("TEST.BACKEND.NAME onnxruntime needs onnxruntime, onnx and onnxscript: pip install -e '.[onnx]'") from e

    exportable, key = ExportableRetinaFocal(model), network_key(cfg, model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only

    def load(size: Size) -> Network:
        label = size_label(size)
        path = cached(os.path.join(cache_dir(cfg), f"onnx-{key}-{label}-float32.onnx"),
                      lambda out: export_onnx(exportable, example_image(model, size), out), f"ONNX export ({label})")
        if cfg.TEST.BACKEND.INT8:
            path = cached(path.replace("-float32.onnx", "-int8.onnx"),
                          lambda out: quantize_int8(path, out, calibration_images(cfg, model, size)), f"int8 quantization ({label})")
        session = loaded(path, lambda p: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]))
        return lambda image: session.run(None, {"image": image.cpu().numpy()})

    logger.info(f"onnxruntime backend ({'int8' if cfg.TEST.BACKEND.INT8 else 'float32'}), {options.intra_op_num_threads} threads")
    return PerSizePrograms(model, load, "onnxruntime")


# --------------------------------------------------------------------------------- int8


def calibration_images(cfg, model: nn.Module, size: Size) -> List[np.ndarray]:
    """``TEST.BACKEND.CALIBRATION_IMAGES`` images of ``DATASETS.TRAIN``, evenly spaced through
    it, as the test-time mapper reads and resizes them, padded (1, 3, H, W) float32 numpy; for a
    fixed-size program, those that fit its size, padded to it."""
    records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    count = min(cfg.TEST.BACKEND.CALIBRATION_IMAGES, len(records))
    picked = [records[i] for i in np.linspace(0, len(records) - 1, count).round().astype(int)]
    mapper = DatasetMapper(cfg, is_train=False)
    images = [mapper(r)["image"].to(model.device, torch.float32)[None] for r in picked]  # (1, 3, H, W)
    if size is not None:
        images = [x for x in images if x.shape[-2] <= size[0] and x.shape[-1] <= size[1]]
        if not images:
            raise ValueError(f"no image of DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} fits the {size_label(size)} int8 program")
    logger.info(f"int8 calibration on {len(images)} images of DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    return [padded_for_export(model, x, size).cpu().numpy() for x in images]


def quantize_int8(source: str, path: str, images: Sequence[np.ndarray]) -> None:
    """ONNX Runtime's static quantization of ``source`` into ``path``: the convolutions (where the
    time goes; GroupNorm and the rest stay float32), QDQ nodes, weights int8 per output channel
    with a 7-bit range (``reduce_range``: without VNNI, AVX2's and AVX-512's
    u8 x s8 multiply-add saturates at full range), activations uint8 calibrated by their
    min-max over ``images``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Images(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(images)

        def get_next(self):
            image = next(self.remaining, None)
            return None if image is None else {"image": image}

    quant_logger = logging.getLogger()  # onnxruntime.quantization advises pre-processing through the root logger
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_static(source, path, Images(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        quant_logger.setLevel(level)
