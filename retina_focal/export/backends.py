"""Inference backends: what runs RetinaFocal's network at test time (``TEST.BACKEND.*``).

The network is :class:`~retina_focal.export.ExportableRetinaFocal`: normalization, backbone,
head and anchors of one padded image. A backend replaces it; the post-processing that
follows (§4.1's threshold, top-k, decode and NMS, and the rescaling) is the model's own in
every backend (:func:`retina_focal.export.postprocess`). ``TEST.BACKEND.NAME``:

* ``eager``: the PyTorch model as it trained (the default; batches as detectron2 pads them);
* ``compiled``: ``torch.export`` + AOTInductor (C++ code generated and built for this CPU,
  weights frozen into it). H and W are dynamic, so one compilation serves every padded size
  from twice the largest feature stride (256 px for P7) to 4096 px; a size outside (the
  128-px demo) gets a program of its own. ``TEST.AMP`` is compiled into it. With
  ``TEST.BACKEND.INT8``: the network quantized by PT2E + torchao's ``X86InductorQuantizer``
  and compiled by ``torch.compile`` with freezing into oneDNN int8 convolutions (VNNI, AMX);
* ``onnxruntime``: the ONNX export run by ONNX Runtime's CPU provider, float32, or int8 with
  ``TEST.BACKEND.INT8`` (QDQ);
* ``auto``: one of the above and its precision, chosen from the CPU's ISA flags
  (:func:`choose_backend`), logged.

int8 is static post-training quantization calibrated on ``TEST.BACKEND.CALIBRATION_IMAGES``
images of ``DATASETS.TRAIN`` (retina_focal/export/quantization.py).

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
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
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
from retina_focal.export.quantization import (
    CompiledPerShape,
    Size,
    calibration_images,
    load_int8,
    quantize_onnx_int8,
    quantize_pt2e_int8,
)
from retina_focal.modeling.precision import amp_dtype
from retina_focal.utils.cpu import BF16_FLAGS, INT8_FLAGS, cpu_flags, int8_needs_reduced_range

__all__ = [
    "INFERENCE_BACKEND_REGISTRY",
    "BackendBuildError",
    "BackendModel",
    "add_backend_argument",
    "backend_opts",
    "build_inference_model",
    "check_backend_settings",
    "choose_backend",
    "resolve_auto_backend",
]

logger = logging.getLogger(__name__)

INFERENCE_BACKEND_REGISTRY = Registry("RETINA_FOCAL_INFERENCE_BACKEND")
INFERENCE_BACKEND_REGISTRY.__doc__ = """Functions ``(cfg, model) -> network``; ``TEST.BACKEND.NAME`` names one by its
function name, as detectron2's registries do."""

Network = Callable[[Tensor], Sequence]
INT8_ALIASES = ("compiled-int8", "onnxruntime-int8")


def check_backend_settings(cfg) -> None:
    """Raise ValueError, naming the keys, for backend settings that fit nothing."""
    name = cfg.TEST.BACKEND.NAME
    known = backend_names()
    if name not in known:
        raise ValueError(f"TEST.BACKEND.NAME must be one of {known}, got {name!r}")
    if name not in ("eager", "auto") and torch.device(cfg.MODEL.DEVICE).type != "cpu":
        raise ValueError(f"TEST.BACKEND.NAME {name} runs on the CPU; with MODEL.DEVICE {cfg.MODEL.DEVICE} use eager")
    if cfg.TEST.BACKEND.INT8 and name not in ("compiled", "onnxruntime", "auto"):
        raise ValueError(f"TEST.BACKEND.INT8 True needs TEST.BACKEND.NAME compiled or onnxruntime, got {name!r}")
    if cfg.TEST.BACKEND.INT8 and cfg.TEST.AMP.ENABLED:
        raise ValueError("TEST.BACKEND.INT8 and TEST.AMP.ENABLED are two precisions; turn one off")
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
    return ["eager", "auto", *sorted(name for name, _ in INFERENCE_BACKEND_REGISTRY)]


def add_backend_argument(parser) -> None:
    """``--backend NAME``: ``TEST.BACKEND.NAME NAME``; ``compiled-int8`` and ``onnxruntime-int8``
    also set ``TEST.BACKEND.INT8 True``."""
    parser.add_argument(
        "--backend",
        choices=[*backend_names(), *INT8_ALIASES],
        help="inference backend (TEST.BACKEND.NAME; NAME-int8 = NAME with TEST.BACKEND.INT8 True; auto: chosen "
        "from the CPU's ISA flags); bfloat16 for eager and compiled: TEST.AMP.ENABLED True",
    )


def backend_opts(args) -> List:
    """The config overrides of ``args.backend`` (none without ``--backend``)."""
    backend = getattr(args, "backend", None)
    if backend is None:
        return []
    if backend in INT8_ALIASES:
        return ["TEST.BACKEND.NAME", backend[: -len("-int8")], "TEST.BACKEND.INT8", True]
    return ["TEST.BACKEND.NAME", backend]


def build_inference_model(cfg, model: nn.Module) -> nn.Module:
    """``model`` (eval mode, weights loaded) itself for the eager backend, else a
    :class:`BackendModel` whose network is ``TEST.BACKEND.NAME``'s. For ``auto``, the choice
    is made here; a bfloat16 choice sets the model's inference dtype (``TEST.AMP``)."""
    check_backend_settings(cfg)
    if cfg.TEST.BACKEND.NAME == "auto":
        cfg = resolve_auto_backend(cfg)
        if cfg.TEST.AMP.ENABLED:  # the model was built before the choice: it runs the chosen precision
            model.inference_dtype = amp_dtype(cfg.TEST.AMP.PRECISION, cfg.MODEL.DEVICE, "TEST.AMP.PRECISION")
    if cfg.TEST.BACKEND.NAME == "eager":
        return model
    return BackendModel(model, INFERENCE_BACKEND_REGISTRY.get(cfg.TEST.BACKEND.NAME)(cfg, model.eval()))


# ------------------------------------------------------------------------------- auto


def choose_backend(flags: Set[str], installed: Set[str], can_calibrate: bool, device_type: str = "cpu",
                   precision_set: str = "", group_norm: bool = False) -> Tuple[List, str]:
    """``TEST.BACKEND.NAME auto``'s choice: (config overrides, why), the fastest backend and
    precision whose accuracy stays within the documented tolerance (docs/benchmark.md: int8
    within 1.0 AP of float32, bfloat16 within 0.3), from the CPU's ISA ``flags``, the
    ``installed`` optional packages (torchao, onnxruntime), whether int8 can be calibrated
    (``DATASETS.TRAIN`` not empty) and whether FPN or head use GroupNorm (``group_norm``:
    GroupNorm stays float32 in both int8 backends, and the conversions around it cost more than
    the int8 convolutions save: measured on the demo model, docs/benchmark.md).
    ``precision_set``: "int8" or "bfloat16" when the config turned one on itself, which is
    kept (only the backend is chosen)."""
    int8_isa = sorted(flags & set(INT8_FLAGS))
    bf16_isa = sorted(flags & set(BF16_FLAGS))
    int8 = ["TEST.BACKEND.INT8", True]
    bf16 = ["TEST.AMP.ENABLED", True, "TEST.AMP.PRECISION", "bfloat16"]
    if device_type != "cpu":
        return ["TEST.BACKEND.NAME", "eager"], f"MODEL.DEVICE is {device_type}: the backends other than eager run on the CPU"
    if precision_set == "bfloat16":
        return ["TEST.BACKEND.NAME", "compiled"], "TEST.AMP.ENABLED is set: compiled runs bfloat16"
    if precision_set == "int8":
        name = "compiled" if "torchao" in installed and (int8_isa or "onnxruntime" not in installed) else "onnxruntime"
        return ["TEST.BACKEND.NAME", name], f"TEST.BACKEND.INT8 is set: {name} int8 on {', '.join(int8_isa) or 'a CPU without VNNI'}"
    if int8_isa and "torchao" in installed and can_calibrate and not group_norm:
        return ["TEST.BACKEND.NAME", "compiled", *int8], f"{', '.join(int8_isa)}: oneDNN's int8 convolutions (PT2E + Inductor)"
    if bf16_isa:
        return ["TEST.BACKEND.NAME", "compiled", *bf16], f"{', '.join(bf16_isa)}: oneDNN's bfloat16 convolutions"
    if group_norm:
        return ["TEST.BACKEND.NAME", "compiled"], "no bfloat16 kernels, and GroupNorm keeps int8 from paying: AOTInductor float32"
    if "onnxruntime" in installed and can_calibrate:
        return ["TEST.BACKEND.NAME", "onnxruntime", *int8], "no bfloat16 and no torchao or no VNNI: ONNX Runtime's int8 kernels"
    if "onnxruntime" in installed:
        return ["TEST.BACKEND.NAME", "onnxruntime"], "no bfloat16 and nothing to calibrate int8 on: ONNX Runtime float32"
    return ["TEST.BACKEND.NAME", "compiled"], "no bfloat16, no onnxruntime: AOTInductor float32"


def resolve_auto_backend(cfg):
    """``cfg`` itself, or for ``TEST.BACKEND.NAME auto`` a copy with :func:`choose_backend`'s
    choice for this machine merged in (and logged)."""
    if cfg.TEST.BACKEND.NAME != "auto":
        return cfg
    installed = {name for name in ("torchao", "onnxruntime") if importlib.util.find_spec(name) is not None}
    precision_set = "int8" if cfg.TEST.BACKEND.INT8 else "bfloat16" if cfg.TEST.AMP.ENABLED else ""
    flags = cpu_flags()
    group_norm = "GN" in (cfg.MODEL.FPN.NORM, cfg.MODEL.RETINANET.NORM)
    opts, why = choose_backend(flags, installed, bool(cfg.DATASETS.TRAIN), torch.device(cfg.MODEL.DEVICE).type, precision_set,
                               group_norm)
    chosen = cfg.clone()
    chosen.defrost()
    chosen.merge_from_list(opts)
    chosen.freeze()
    logger.info(f"TEST.BACKEND.NAME auto: {' '.join(map(str, opts))} ({why})")
    return chosen


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
    after changing a set's images under the same name, empty the cache), the test-time
    resize, torchao's version and the weight range (7 bits without VNNI)."""
    network_cfg = cfg.MODEL.clone()
    for key in _KEYS_AFTER_THE_NETWORK:
        node, leaf = network_cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        node[leaf[-1]] = None
    texts = [network_cfg.dump(), cfg.INPUT.FORMAT, cfg.TEST.AMP.dump(), torch.__version__, _version("onnxruntime"),
             torch.backends.cpu.get_cpu_capability()]
    if cfg.TEST.BACKEND.INT8:
        texts += [str(cfg.TEST.BACKEND.CALIBRATION_IMAGES), str(list(cfg.DATASETS.TRAIN)), _version("torchao"),
                  str((cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)), str(int8_needs_reduced_range())]
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"no {package}"


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
    """A network that builds (or loads) the program of each :func:`program_size` on first use:
    ``load(size, image)`` with the first padded image of that size.

    A program that fails to build raises :class:`BackendBuildError`, once: the failure is kept
    and raised again at once for every later image, not built again (a failed AOTInductor
    build takes minutes)."""

    def __init__(self, model: nn.Module, load: Callable[[Size, Tensor], Network], name: str):
        self.model, self.load, self.name = model, load, name
        self.programs: Dict[Size, Network] = {}
        self.failure: Optional[BackendBuildError] = None

    def __call__(self, image: Tensor) -> Sequence:
        if self.failure is not None:
            raise self.failure
        size = program_size(self.model, image)
        if size not in self.programs:
            try:
                self.programs[size] = self.load(size, image)
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
    """torch.export + AOTInductor, the packages (.pt2) cached on disk; with TEST.BACKEND.INT8,
    :func:`compiled_int8`."""
    exportable, key = ExportableRetinaFocal(model), network_key(cfg, model)
    if cfg.TEST.BACKEND.INT8:
        return compiled_int8(cfg, model, exportable, key)

    def load(size: Size, _first: Tensor) -> Network:
        def build(path: str) -> None:
            example = example_image(model, size)
            with torch.no_grad():
                program = torch.export.export(exportable, (example,), dynamic_shapes=export_dynamic_shapes(exportable, example))
                torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs={"freezing": True})

        label = size_label(size)
        path = cached(os.path.join(cache_dir(cfg), f"compiled-{key}-{label}.pt2"), build, f"compiled backend ({label})")
        return loaded(path, torch._inductor.aoti_load_package)

    return PerSizePrograms(model, load, "compiled")


def compiled_int8(cfg, model: nn.Module, exportable: nn.Module, key: str) -> Network:
    """The PT2E int8 program of each :func:`program_size` (quantized and calibrated once, cached
    on disk as a torch.export .pt2), compiled by ``torch.compile`` with freezing in each process
    for each padded input size at its first image (Inductor's own cache makes a second
    compilation faster): inputs of one size pay once, a dataset of many sizes pays per size."""

    def load(size: Size, first: Tensor) -> Network:
        label, example = size_label(size), example_image(model, size)

        def build(path: str) -> None:
            images = calibration_images(cfg, model, size)
            torch.export.save(quantize_pt2e_int8(exportable, example, export_dynamic_shapes(exportable, example), images), path)

        path = cached(os.path.join(cache_dir(cfg), f"compiled-{key}-{label}-int8.pt2"), build, f"int8 quantization ({label})")
        network = CompiledPerShape(loaded(path, load_int8), label)
        network(first)  # compiled now for the first image's shape: a failure is a BackendBuildError, raised once
        return network

    logger.info(f"compiled int8 backend (oneDNN), {'7-bit' if int8_needs_reduced_range() else '8-bit'} weights")
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

    def load(size: Size, _first: Tensor) -> Network:
        label = size_label(size)
        path = cached(os.path.join(cache_dir(cfg), f"onnx-{key}-{label}-float32.onnx"),
                      lambda out: export_onnx(exportable, example_image(model, size), out), f"ONNX export ({label})")
        if cfg.TEST.BACKEND.INT8:
            path = cached(path.replace("-float32.onnx", "-int8.onnx"),
                          lambda out: quantize_onnx_int8(path, out, calibration_images(cfg, model, size)), f"int8 quantization ({label})")
        session = loaded(path, lambda p: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]))
        return lambda image: session.run(None, {"image": image.cpu().numpy()})

    logger.info(f"onnxruntime backend ({'int8' if cfg.TEST.BACKEND.INT8 else 'float32'}), {options.intra_op_num_threads} threads")
    return PerSizePrograms(model, load, "onnxruntime")
