"""A training data order that a resumed run continues exactly.

detectron2's TrainingSampler restarts its shuffled stream from the beginning when training
resumes, and its augmentations draw from whatever state the global RNGs are in. Here the data of
every iteration is a pure function of (seed, iteration, rank):

* the *stream*: epoch e is the permutation `default_rng([seed, e]).permutation(N)`; the epochs
  are concatenated into one infinite stream of dataset indices, and stream position p belongs to
  rank p % world_size (as detectron2 shards its stream);
* the *batches*: each rank groups its share of the stream into batches of its per-process batch
  size, optionally keeping landscape and portrait images apart (detectron2's aspect-ratio
  grouping, done here on indices so that it can be replayed);
* the *augmentations*: the sample at stream position p is mapped with the global NumPy, Python and
  torch CPU generators seeded with `mix_seed(seed, p)` (and restored afterwards), whichever
  process maps it.

Resuming at iteration k skips the first k batches of this rank's batch stream (indices only: no
image is read), so the resumed run sees the very batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "SeededMapDataset",
    "aspect_ratio_groups",
    "build_resumable_train_loader",
    "mix_seed",
    "seeded_rngs",
]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 32-bit seed from a sequence of integers (splitmix64 rounds), e.g. (seed, position).

    Nearby inputs give unrelated outputs, so consecutive stream positions get independent
    augmentation draws.
    """
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state & 0xFFFFFFFF


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed NumPy's, Python's and torch's CPU global generators with `seed` for the duration of
    the block, then put their previous states back (the caller's randomness is untouched)."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    torch_state = torch.get_rng_state()
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are left alone
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


def aspect_ratio_groups(dataset_dicts: Sequence[dict]) -> list[int]:
    """0 for landscape images (width > height), 1 otherwise, as detectron2 groups them."""
    groups = []
    for index, record in enumerate(dataset_dicts):
        if "width" not in record or "height" not in record:
            raise KeyError(
                f"aspect-ratio grouping needs 'width' and 'height' in every dataset dict; entry "
                f"{index} ({record.get('file_name', '?')}) lacks them"
            )
        groups.append(0 if record["width"] > record["height"] else 1)
    return groups


class ResumableBatchSampler(Sampler):
    """This process's batches of (dataset index, sample seed), infinitely, from `start_batch`.

    See the module docstring for the stream. `seed` and `start_batch` may be changed until the
    first batch is drawn (a resumed run sets them from its checkpoint).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        group_ids: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        """
        Args:
            dataset_size: N, the number of samples.
            batch_size: samples per batch of this process.
            seed: the run's seed (non-negative).
            group_ids: a group per sample (length N); a batch only holds one group. None: one
                group.
            rank, world_size: this process's share of the stream.
            start_batch: how many batches to skip (the iteration to resume at).
        """
        super().__init__()
        if dataset_size <= 0:
            raise ValueError(f"the training set is empty (dataset_size={dataset_size})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if group_ids is not None and len(group_ids) != dataset_size:
            raise ValueError(f"{len(group_ids)} group ids for {dataset_size} samples")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.seed < 0 or self.start_batch < 0:
            raise ValueError(
                f"seed ({self.seed}) and start_batch ({self.start_batch}) must be >= 0"
            )
        batches = itertools.islice(self._position_batches(), self.start_batch, None)
        # Seeds are only computed for the batches that are used, not for the skipped ones.
        for batch in batches:
            yield [(index, mix_seed(self.seed, position)) for index, position in batch]

    def _position_batches(self) -> Iterator[list[tuple[int, int]]]:
        """Batches of (dataset index, stream position) of this rank, from the stream's start."""
        buckets: dict[int, list[tuple[int, int]]] = {}
        epoch, permutation = -1, None
        for position in itertools.count(self.rank, self.world_size):
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                permutation = self.epoch_permutation(epoch)
            index = int(permutation[position % self.dataset_size])
            group = self.group_ids[index] if self.group_ids is not None else 0
            bucket = buckets.setdefault(group, [])
            bucket.append((index, position))
            if len(bucket) == self.batch_size:
                yield bucket
                buckets[group] = []

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """(N,) the dataset indices in the order of `epoch`."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)


class SeededMapDataset(Dataset):
    """Maps dataset dicts with a mapper whose random draws are seeded per sample.

    Items are (index, seed) pairs, as :class:`ResumableBatchSampler` yields them.
    """

    def __init__(self, dataset: Sequence[dict], mapper: Callable[[dict], dict]):
        # DatasetFromList serialises the dicts into one buffer: workers share it cheaply.
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        record = self.dataset[index]
        with seeded_rngs(seed):
            mapped = self.mapper(record)
        if mapped is None:
            # detectron2's MapDataset would retry with a random other sample: that breaks the
            # reproducible order, so it is refused.
            raise ValueError(
                f"the mapper returned None for dataset entry {index} "
                f"({record.get('file_name', '?')}); the resumable loader needs every sample"
            )
        return mapped


def _list_collate(batch: list) -> list:
    return batch


class ResumableTrainLoader:
    """Iterable of training batches (lists of mapped dicts) from a :class:`ResumableBatchSampler`.

    Nothing is read before the first batch is requested, so that :meth:`resume_at` can still set
    the seed and the start (a trainer creates its iterator before the checkpoint is loaded).
    """

    def __init__(
        self,
        dataset: SeededMapDataset,
        sampler: ResumableBatchSampler,
        *,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = num_workers
        self.collate_fn = collate_fn or _list_collate
        self._started = False

    def resume_at(self, iteration: int, seed: int) -> None:
        """Start at batch `iteration` of the stream of `seed` (before the first batch only)."""
        if self._started:
            raise RuntimeError("resume_at() after the loader started producing batches")
        self.sampler.start_batch = int(iteration)
        self.sampler.seed = int(seed)

    def __iter__(self) -> Iterator[list]:
        self._started = True
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            # The loader draws its workers' base seed from this generator: with the default
            # (global) one it would shift the model's random draws at the first batch.
            generator=torch.Generator().manual_seed(self.sampler.seed),
        )
        yield from loader


def build_resumable_train_loader(
    dataset: Sequence[dict],
    *,
    mapper: Callable[[dict], dict],
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    sampler: None = None,
    seed: int = 0,
) -> ResumableTrainLoader:
    """The arguments of detectron2's `build_detection_train_loader`, with a resumable order.

    Args:
        dataset: a list of dataset dicts (e.g. from get_detection_dataset_dicts).
        mapper: dataset dict -> model input; its global-RNG draws are seeded per sample.
        total_batch_size: the batch size summed over all processes.
        aspect_ratio_grouping: keep landscape and portrait images in separate batches.
        num_workers: data-loading worker processes.
        collate_fn: batch (list of mapped dicts) -> model input; default: the list itself.
        sampler: must be None (the sampler is this loader's own).
        seed: the stream's seed (a trainer may replace it with :meth:`ResumableTrainLoader.
            resume_at` before the first batch).
    """
    if sampler is not None:
        raise ValueError(
            "dataloader.train.sampler is set, but the resumable train loader uses its own "
            "sampler; remove the key"
        )
    world_size, rank = comm.get_world_size(), comm.get_rank()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"dataloader.train.total_batch_size={total_batch_size} must be a positive multiple "
            f"of the number of processes ({world_size})"
        )
    groups = aspect_ratio_groups(dataset) if aspect_ratio_grouping else None
    batch_sampler = ResumableBatchSampler(
        len(dataset),
        total_batch_size // world_size,
        seed=seed,
        group_ids=groups,
        rank=rank,
        world_size=world_size,
    )
    return ResumableTrainLoader(
        SeededMapDataset(dataset, mapper),
        batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
