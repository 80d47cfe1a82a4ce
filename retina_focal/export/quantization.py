"""Static int8 post-training quantization of the network (``TEST.BACKEND.INT8``), in two flavours:

* :func:`quantize_pt2e_int8` (``TEST.BACKEND.NAME compiled``): PyTorch 2 export quantization
  with torchao's ``X86InductorQuantizer`` (``pip install -e '.[int8]'``); Inductor then lowers
  the quantized convolutions to oneDNN's int8 kernels (VNNI, AMX-INT8), fused with their ReLU
  and residual add;
* :func:`quantize_onnx_int8` (``TEST.BACKEND.NAME onnxruntime``): ONNX Runtime's QDQ
  quantization of the ONNX export.

Both calibrate activations on :func:`calibration_images` (``TEST.BACKEND.CALIBRATION_IMAGES``
images of ``DATASETS.TRAIN``); weights are int8 per output channel, activations uint8 per
tensor, with the 7-bit weight range (``reduce_range``) only on CPUs without VNNI or AMX-INT8
(:func:`retina_focal.utils.cpu.int8_needs_reduced_range`).
"""
import logging
import operator
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from torch import Tensor, nn
from torch.nn import functional as F

from retina_focal.export.torch_export import padded_for_export
from retina_focal.utils.cpu import int8_needs_reduced_range

__all__ = ["CompiledPerShape", "calibration_images", "compile_int8", "load_int8", "quantize_onnx_int8", "quantize_pt2e_int8"]

logger = logging.getLogger(__name__)

Size = Optional[Tuple[int, int]]  # None: the dynamic-shape program; (H, W): a fixed-size one


def calibration_images(cfg, model: nn.Module, size: Size) -> List[Tensor]:
    """``TEST.BACKEND.CALIBRATION_IMAGES`` images of ``DATASETS.TRAIN``, evenly spaced through
    it, as the test-time mapper reads and resizes them, padded (1, 3, H, W) float32 on the CPU;
    for a fixed-size program, those that fit its size, padded to it."""
    records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    count = min(cfg.TEST.BACKEND.CALIBRATION_IMAGES, len(records))
    picked = [records[i] for i in np.linspace(0, len(records) - 1, count).round().astype(int)]
    mapper = DatasetMapper(cfg, is_train=False)
    images = [mapper(r)["image"].to(model.device, torch.float32)[None] for r in picked]  # (1, 3, H, W)
    if size is not None:
        images = [x for x in images if x.shape[-2] <= size[0] and x.shape[-1] <= size[1]]
        if not images:
            raise ValueError(f"no image of DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} fits the {size[0]}x{size[1]} int8 program")
    logger.info(f"int8 calibration on {len(images)} images of DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    return [padded_for_export(model, x, size).cpu() for x in images]


# ----------------------------------------------------------------------- PT2E + Inductor


def _torchao():
    """torchao's PT2E quantization (its import also registers Inductor's int8 lowering passes)."""
    try:
        import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.constant_fold import constant_fold
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as e:
        raise ImportError("TEST.BACKEND.INT8 with TEST.BACKEND.NAME compiled needs torchao: pip install -e '.[int8]'") from e
    return constant_fold, quantize_pt2e, x86_inductor_quantizer


def quantize_pt2e_int8(exportable: nn.Module, example: Tensor, dynamic_shapes: Optional[Dict],
                       images: Sequence[Tensor]) -> torch.export.ExportedProgram:
    """``exportable`` exported, quantized by torchao's ``X86InductorQuantizer`` (static, weights
    per channel) and calibrated on ``images``: the program that ``torch.compile`` with
    ``freezing`` turns into oneDNN int8 convolutions."""
    constant_fold, quantize_pt2e, x86 = _torchao()

    with torch.no_grad():
        graph = torch.export.export(exportable, (example,), dynamic_shapes=dynamic_shapes).module()
        constant_fold(graph)  # folded frozen BN: the weights quantize as constants, not per call
        _untie_shared_conv_weights(graph)
        _one_source_partition_per_op(graph)
        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config(reduce_range=int8_needs_reduced_range()))
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        for image in images:
            prepared(image)
        return torch.export.export(quantize_pt2e.convert_pt2e(prepared), (example,), dynamic_shapes=dynamic_shapes)


def _untie_shared_conv_weights(graph: torch.fx.GraphModule) -> int:
    """Give each convolution its own copy of a weight it shares: the head's convs run on all
    five levels (§4, the subnets' parameters are shared across levels), and Inductor's int8
    convolution takes a weight with a single use. Returns how many copies were made."""
    copies = 0
    for node in list(graph.graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2 or any(u.target != torch.ops.aten.conv2d.default for u in node.users):
            continue
        owner, _, leaf = node.target.rpartition(".")
        value = getattr(graph.get_submodule(owner), leaf)
        for i, user in enumerate(list(node.users)[1:], start=1):
            name = f"{node.target.replace('.', '_')}_use{i}"
            graph.register_buffer(name, value.detach().clone())
            with graph.graph.inserting_before(user):
                copy = graph.graph.get_attr(name)
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            copies += 1
    graph.recompile()
    return copies


# The sources by which X86InductorQuantizer recognizes the ops it quantizes and fuses.
_SOURCES = {
    torch.ops.aten.conv2d.default: F.conv2d,
    torch.ops.aten.relu.default: F.relu,
    torch.ops.aten.relu_.default: F.relu,
    torch.ops.aten.hardtanh.default: F.hardtanh,  # ReLU6 (MobileNetV2)
    torch.ops.aten.hardtanh_.default: F.hardtanh,
    torch.ops.aten.add.Tensor: operator.add,
    torch.ops.aten.add_.Tensor: operator.add,
}


def _one_source_partition_per_op(graph: torch.fx.GraphModule) -> None:
    """Mark each op as its own source partition. The quantizer groups ops by the module call
    they came from: detectron2's ``Conv2d`` holds its norm and activation (one partition with
    several outputs, which it rejects), a shared head conv is one module called five times,
    and a subclass of ``nn.Conv2d`` is not recognized at all."""
    for node in graph.graph.nodes:
        if node.op == "call_function":
            node.meta["source_fn_stack"] = [(node.name, _SOURCES.get(node.target, node.target))]


def load_int8(path: str) -> torch.export.ExportedProgram:
    """A program saved from :func:`quantize_pt2e_int8` (torchao registers the ops it holds)."""
    _torchao()
    return torch.export.load(path)


def compile_int8(program: torch.export.ExportedProgram, image: Tensor):
    """``program`` compiled by Inductor with ``freezing`` (weights as constants, the int8
    convolutions prepacked for oneDNN, fused with their ReLU and add) for the shape of
    ``image``, compiled now by one call on it. One static shape per compilation: with dynamic H
    and W, oneDNN's int8 convolutions run about 5x slower (R-50-FPN at 512 px on the AMX Xeon
    measured: 160 ms against 33 ms); and JIT rather than AOTInductor, whose int8 package ran in
    44-52 ms at a fixed size."""
    _torchao()
    module = torch.compile(program.module(), dynamic=False)

    def network(x: Tensor):
        # Inductor's global freezing switch (``options={"freezing": True}`` does not reach the
        # pass that prepacks the int8 weights)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return module(x)

    network(image)
    return network


class CompiledPerShape:
    """The int8 ``program`` (quantized once, with dynamic H and W) compiled for each input
    shape at its first image (:func:`compile_int8`; each compilation is logged)."""

    def __init__(self, program: torch.export.ExportedProgram, label: str):
        self.program, self.label = program, label
        self.compiled: Dict[Tuple[int, ...], object] = {}

    def __call__(self, image: Tensor):
        shape = tuple(image.shape)
        if shape not in self.compiled:
            start = time.perf_counter()
            self.compiled[shape] = compile_int8(self.program, image)
            logger.info(f"compiled int8 ({self.label}): torch.compile for {'x'.join(map(str, shape[-2:]))} px "
                        f"in {time.perf_counter() - start:.1f} s")
        return self.compiled[shape](image)


# ----------------------------------------------------------------------------- ONNX Runtime


def quantize_onnx_int8(source: str, path: str, images: Sequence[Tensor]) -> None:
    """ONNX Runtime's static quantization of ``source`` into ``path``: the convolutions (where the
    time goes; GroupNorm and the rest stay float32), QDQ nodes, weights int8 per output channel,
    activations uint8 calibrated by their min-max over ``images``. Without VNNI the u8 x s8
    multiply-add of AVX2 and AVX-512 saturates at full range, so the weights then keep 7 bits."""
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
            return None if image is None else {"image": image.numpy()}

    quant_logger = logging.getLogger()  # onnxruntime.quantization advises pre-processing through the root logger
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_static(source, path, Images(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        per_channel=True, reduce_range=int8_needs_reduced_range(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    finally:
        quant_logger.setLevel(level)
