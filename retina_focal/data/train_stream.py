"""A training data stream that resumes exactly where a checkpoint left it.

detectron2's ``TrainingSampler`` restarts its shuffle from the beginning after
``--resume`` and augmentations draw from the workers' global RNGs, so a resumed run sees
other images and other flips than the uninterrupted run would have. Here everything that
decides a training sample is a function of its *stream position* q = 0, 1, 2, ...:

* which image: epoch e = q // n uses the permutation ``randperm(n, seed + e)``;
* which augmentation: numpy's and Python's RNGs are re-seeded from (seed, q) right before
  the mapper runs;
* who loads it: of the positions from P on, rank r of W takes P + r, P + r + W, ...; its
  data-loader workers take chunks of them in a fixed order.

After ``k`` finished iterations with a total batch B, the run has consumed the positions
0 .. k·B - 1, so :meth:`ResumableTrainLoader.start_at` (P = k·B) continues the very same
stream. Checkpoints hold the stream seed and the number of images consumed (``state_dict``),
so this holds with ``SEED -1``, and a resume that changes the batch or the number of
processes (``RESUME.ALLOW_CHANGES``) continues at the image where the old run stopped.
Exact continuation needs batches formed in stream order: it holds with
``DATALOADER.ASPECT_RATIO_GROUPING False``, or when all images fall in one aspect-ratio
group (e.g. square images); otherwise only the few images buffered in the aspect-ratio
groups at the time of the checkpoint differ.
"""
import itertools
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.common import MapDataset, ToIterableDataset
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]


class PositionedDataset(Dataset):
    """Map a stream position q to ``(sample_seed, dataset_dict)`` (epoch-wise shuffled)."""

    def __init__(self, dicts: List[Dict], seed: int, shuffle: bool = True):
        self.dicts = dicts
        self.seed = seed
        self.shuffle = shuffle
        self._epoch: Optional[int] = None
        self._order: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, position: int) -> Tuple[int, Dict]:
        epoch, offset = divmod(position, len(self.dicts))
        return self.sample_seed(position), self.dicts[self._epoch_order(epoch)[offset]]

    def sample_seed(self, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(len(self.dicts), generator=g)
            else:
                self._order = torch.arange(len(self.dicts))
            self._epoch = epoch
        return self._order


class SeededMapper:
    """Run ``mapper`` on a dataset dict with numpy's and Python's RNGs seeded for it."""

    def __init__(self, mapper: Callable[[Dict], Any]):
        self.mapper = mapper

    def __call__(self, seeded_dict: Tuple[int, Dict]):
        seed, dataset_dict = seeded_dict
        np.random.seed(seed)
        random.seed(seed)
        return self.mapper(dataset_dict)


class StreamSampler(Sampler):
    """Infinite positions of one rank: q = start + j·W + r for j = 0, 1, ..."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        for j in itertools.count():
            yield self.start + j * self.world_size + self.rank


class ResumableTrainLoader:
    """An iterable of training batches that can start anywhere in its stream.

    Also keeps the last batch it produced (:attr:`last_batch`), for error reports.
    Checkpointable: ``state_dict()`` holds the stream seed and the images consumed so far
    (positions handed out in batches the trainer took, over all ranks).
    """

    def __init__(self, loader, sampler: StreamSampler, dataset: PositionedDataset, total_batch_size: int):
        self.loader = loader
        self.sampler = sampler
        self.dataset = dataset
        self.total_batch_size = total_batch_size
        self.last_batch: Optional[List[Dict]] = None
        self.batches_taken = 0
        self.resumed_images: Optional[int] = None  # from a checkpoint (load_state_dict)

    def start_at(self, iteration: int) -> None:
        """Continue after ``iteration`` finished iterations (call before iterating): at the
        images consumed that a loaded checkpoint recorded, else at ``iteration`` x the total
        batch (the same unless the batch changed)."""
        self.sampler.start = self.resumed_images if self.resumed_images is not None else iteration * self.total_batch_size

    @property
    def images_consumed(self) -> int:
        return self.sampler.start + self.batches_taken * self.total_batch_size

    def __iter__(self):
        for batch in self.loader:
            self.last_batch = batch
            self.batches_taken += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.dataset.seed, "images_consumed": self.images_consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.dataset.seed = int(state["seed"])
        if "images_consumed" in state:  # checkpoints of earlier versions have only the seed
            self.resumed_images = int(state["images_consumed"])


def build_resumable_train_loader(
    dicts: List[Dict],
    mapper: Callable[[Dict], Any],
    *,
    seed: int,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
) -> ResumableTrainLoader:
    """detectron2's training loader over the resumable stream of ``dicts``.

    Args:
        dicts (list[dict]): dataset dicts (detectron2 format).
        mapper (callable): dataset dict -> model input (e.g. ``DatasetMapper(cfg, True)``).
        seed (int): stream seed, the same on every rank (< 0: a shared random seed).
        total_batch_size (int): images per iteration over all ranks.
        aspect_ratio_grouping, num_workers: as ``build_detection_train_loader``.
    """
    world_size = comm.get_world_size()
    if total_batch_size % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total_batch_size} must be divisible by the number of processes ({world_size})"
        )
    if seed < 0:
        seed = comm.shared_random_seed()
    batch_size = total_batch_size // world_size
    dataset = PositionedDataset(dicts, seed)
    sampler = StreamSampler(comm.get_rank(), world_size)
    # Workers take positions one by one when batches are grouped in the main process (so
    # items arrive in stream order), and whole batches otherwise.
    chunk = 1 if aspect_ratio_grouping else batch_size
    stream = ToIterableDataset(MapDataset(dataset, SeededMapper(mapper)), sampler, shard_chunk_size=chunk)
    loader = build_detection_train_loader(
        stream,
        mapper=None,
        total_batch_size=total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
    )
    return ResumableTrainLoader(loader, sampler, dataset, total_batch_size)
