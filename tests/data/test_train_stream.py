"""The training stream continues exactly after a restart, with or without workers."""
import itertools
import random

import numpy as np
import pytest
from detectron2.utils import comm

from retina_focal.data import build_resumable_train_loader


def _mapper(d):
    """Stands in for DatasetMapper: records which image came and what the RNGs drew for it."""
    return {"image_id": d["image_id"], "draw": (float(np.random.rand()), random.random()), "height": 8, "width": 8}


DICTS = [{"image_id": i, "height": 8, "width": 8} for i in range(10)]


def _batches(num, start=0, seed=5, **kwargs):
    loader = build_resumable_train_loader(DICTS, _mapper, seed=seed, total_batch_size=4, **kwargs)
    loader.start_at(start)
    return [[(x["image_id"], x["draw"]) for x in b] for b in itertools.islice(loader, num)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("grouping", [True, False])
def test_restart_at_iteration_k_continues_the_same_stream(num_workers, grouping):
    kwargs = dict(num_workers=num_workers, aspect_ratio_grouping=grouping)
    uninterrupted = _batches(7, **kwargs)  # 28 images: crosses two epoch boundaries
    assert _batches(4, start=3, **kwargs) == uninterrupted[3:]


def test_every_epoch_is_a_new_permutation_with_fresh_augmentation():
    ids = [i for b in _batches(5) for i, _ in b]
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))
    assert ids[:10] != ids[10:20]
    draws = [d for b in _batches(5) for _, d in b]
    assert len(set(draws)) == len(draws)


def test_seed_changes_the_stream_and_is_restored_from_a_checkpoint():
    assert _batches(2, seed=5) != _batches(2, seed=6)
    saved = build_resumable_train_loader(DICTS, _mapper, seed=5, total_batch_size=4).state_dict()
    restored = build_resumable_train_loader(DICTS, _mapper, seed=99, total_batch_size=4)
    restored.load_state_dict(saved)
    assert [[(x["image_id"], x["draw"]) for x in b] for b in itertools.islice(restored, 2)] == _batches(2, seed=5)


def test_last_batch_is_recorded_and_batch_size_must_divide(monkeypatch):
    loader = build_resumable_train_loader(DICTS, _mapper, seed=1, total_batch_size=2)
    batch = next(iter(loader))
    assert loader.last_batch is batch
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH=3 must be divisible by the number of processes \(2\)"):
        build_resumable_train_loader(DICTS, _mapper, seed=1, total_batch_size=3, aspect_ratio_grouping=False)


def _loader(total_batch_size, seed=5):
    return build_resumable_train_loader(DICTS, _mapper, seed=seed, total_batch_size=total_batch_size,
                                        aspect_ratio_grouping=False)


def _ids(loader, num):
    return [[(x["image_id"], x["draw"]) for x in b] for b in itertools.islice(loader, num)]


def test_the_checkpoint_records_the_images_consumed_and_a_new_batch_size_continues_there():
    """--resume with RESUME.ALLOW_CHANGES and another SOLVER.IMS_PER_BATCH: the stream goes on
    at the image where the old run stopped (positions, not iterations x the new batch)."""
    old = _loader(4)
    old.start_at(0)
    seen = _ids(old, 3)  # 3 iterations of 4 images
    state = old.state_dict()
    assert state == {"seed": 5, "images_consumed": 12}
    uninterrupted = [item for batch in _ids(_started(_loader(4), 0), 6) for item in batch]
    resumed = _loader(2, seed=99)
    resumed.load_state_dict(state)
    resumed.start_at(3)  # iteration 3; 3 x 2 = 6 would repeat images 6..11
    assert [item for batch in _ids(resumed, 4) for item in batch] == uninterrupted[12:20]
    assert [item for batch in seen for item in batch] == uninterrupted[:12]


def _started(loader, iteration):
    loader.start_at(iteration)
    return loader


def test_a_checkpoint_of_an_earlier_version_resumes_at_iteration_times_batch():
    resumed = _loader(4, seed=1)
    resumed.load_state_dict({"seed": 5})
    resumed.start_at(2)
    assert _ids(resumed, 2) == _ids(_started(_loader(4), 0), 4)[2:]
