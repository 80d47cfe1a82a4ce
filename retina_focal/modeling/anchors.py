"""Anchors of §4 ("Anchors"): areas 32²…512² on P3–P7, 3 scales × 3 aspect ratios.

The default config gives each level the sizes {2^0, 2^(1/3), 2^(2/3)} × base and the
ratios {1:2, 1:1, 2:1}, A = 9 anchors per location, covering 32–813 px. Any number of
scales and ratios can be set (Table 1c sweeps 1–4 scales × 1–3 ratios). The anchors are
exactly those of detectron2's ``DefaultAnchorGenerator`` in the same order (location-major,
then size, then ratio), so detectron2 checkpoints keep their meaning.
"""
import math
from collections import abc
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    DefaultAnchorGenerator,
)
from detectron2.structures import Boxes

__all__ = ["RetinaFocalAnchorGenerator", "sub_octave_sizes"]


def sub_octave_sizes(base_sizes: Sequence[float], scales_per_octave: int) -> List[List[float]]:
    """Sizes base·2^(k/n), k < n, per level: the §4 scheme (n = 3) and Table 1c's n = 1…4."""
    return [[b * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)] for b in base_sizes]


def _check_per_level(name: str, values, num_levels: int) -> None:
    """Raise a ValueError naming the cfg key if ``values`` is not usable for ``num_levels``."""
    per_level = values if values and isinstance(values[0], abc.Sequence) else [values]  # LazyConfig: ListConfig
    if len(per_level) not in (1, num_levels):
        raise ValueError(
            f"MODEL.ANCHOR_GENERATOR.{name} has {len(per_level)} lists but the head reads "
            f"{num_levels} feature levels; give 1 list (shared) or {num_levels}: {values}"
        )
    for level in per_level:
        if len(level) == 0 or any(not math.isfinite(v) or v <= 0 for v in level):
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.{name} must hold finite positive numbers, got {values}"
            )


@ANCHOR_GENERATOR_REGISTRY.register()
class RetinaFocalAnchorGenerator(DefaultAnchorGenerator):
    """detectron2's anchors with input checks, a uniform-A guarantee and a per-size cache.

    The grid anchors of a given set of feature-map sizes are computed once per device and
    reused (images of one size, the usual case at test time, skip the work entirely).
    """

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset=0.5, cache_size: int = 16):
        """
        Args:
            sizes (list[list[float]] or list[float]): anchor side lengths (sqrt of area) in
                input pixels, one list per level or one list shared by all levels.
            aspect_ratios (list[list[float]] or list[float]): height / width, same rule.
            strides (list[int]): stride of each feature level.
            offset (float): anchor centre offset within a cell, in [0, 1); 0.5 = centre.
            cache_size (int): how many distinct grid-size tuples to keep anchors for.
        """
        num_levels = len(strides)
        _check_per_level("SIZES", sizes, num_levels)
        _check_per_level("ASPECT_RATIOS", aspect_ratios, num_levels)
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {offset}")
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)
        if len(set(self.num_cell_anchors)) != 1:
            raise ValueError(
                "RetinaFocal shares its head across levels, so every level needs the same "
                f"number of anchors; MODEL.ANCHOR_GENERATOR gives {self.num_cell_anchors}"
            )
        self._cache_size = cache_size
        self._cache: Dict[Tuple, List[torch.Tensor]] = {}

    def forward(self, features: List[torch.Tensor]) -> List[Boxes]:
        """
        Args:
            features (list[Tensor]): per level (N, C, Hi, Wi).

        Returns:
            list[Boxes]: per level (Hi*Wi*A, 4) XYXY anchors in input pixels. Read-only: they
            are shared with later calls of the same grid sizes (no in-place ops on them).
        """
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():  # sizes stay symbolic
            return [Boxes(a) for a in self._grid_anchors(grid_sizes)]
        key = (tuple(grid_sizes), features[0].device)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self._grid_anchors(grid_sizes)
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = anchors
        return [Boxes(a) for a in anchors]

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # .to() / .half() change the buffers the cache was built from
        return super()._apply(fn, *args, **kwargs)
