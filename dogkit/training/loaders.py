"""Training and evaluation data: manifest rows → uint8 RGB tensors, augmented with albumentations.

Loaders ship uint8 HWC batches; the training step moves them to the device, views them as NCHW
(channels_last memory for free) and the model normalises them — normalising per image in numpy
would cost most of a loader's throughput.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from ..data.cache import ImageCache, cache_dir
from ..data.dataset import Dataset, Record
from ..errors import DogkitError
from ..system import available_cpus
from .transforms import AugmentFn


class ManifestImages(torch.utils.data.Dataset):
    """Images of one split as (uint8 HWC tensor, label). Training reads the prepare cache when current.

    ``__getitems__`` serves a whole batch per loader request; a ``SeededBatch`` also reseeds the
    augmentation, so the pixels depend on (seed, epoch, batch) and not on which process made them.
    """

    def __init__(self, dataset: Dataset, records: list[Record], transform: Callable[[np.ndarray], np.ndarray],
                 crop: str, cache: ImageCache | None = None, orientation: bool | None = None):
        self.dataset = dataset
        self.orientation = orientation  # the spec's EXIF rule (None: the dataset's, which its cache follows)
        self.records = records
        self.transform = transform
        self.crop = crop
        self.cache = cache
        self.ring: torch.Tensor | None = None  # shared batch slots, set by make_loader for persistent workers
        # Each record's row in the cache: a small array, rather than a dict of every manifest path.
        row = {r.path: i for i, r in enumerate(dataset.records)} if cache is not None else {}
        self.rows = np.array([row[r.path] for r in records], dtype=np.int64) if cache is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        if self.cache is not None:
            return np.array(self.cache[int(self.rows[i])])  # copy: augmentations may write in place
        return self.dataset.load_rgb(self.records[i], self.crop, self.orientation)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.transform(self.image(i))), self.records[i].label

    def __getitems__(self, batch: list[int]):
        if isinstance(batch, SeededBatch) and isinstance(self.transform, AugmentFn):
            self.transform.set_random_seed(batch.seed)
        ring = self.ring
        if ring is None or getattr(batch, "slot", None) is None or torch.utils.data.get_worker_info() is None:
            return [self[i] for i in batch]
        # In a worker with a ring: write the pixels into the batch's shared slot and send only its number.
        out = ring[batch.slot]
        for j, i in enumerate(batch):
            out[j].copy_(torch.from_numpy(self.transform(self.image(i))))
        return RingBatch(batch.slot, len(batch), [self.records[i].label for i in batch])


class RingBatch(tuple):
    """What a worker sends for a batch written into the shared ring: (slot, size, labels)."""

    def __new__(cls, slot: int, size: int, labels: list[int]):
        return super().__new__(cls, (slot, size, labels))

    def __getnewargs__(self):
        return tuple(self)


class SeededBatch(list):
    """A batch of dataset indices with the seed of its augmentation."""

    def __init__(self, indices, seed: int):
        super().__init__(indices)
        self.seed = seed


class SeededBatchSampler(torch.utils.data.Sampler):
    """Batches of indices, each with its own augmentation seed derived from (seed, epoch, batch).

    The order is a permutation seeded by (seed, epoch), or ``sampler``'s (DistributedSampler) order.
    Because every batch carries its seed, augmentations are the same with 0, 1 or 8 workers and with
    persistent workers, and a resumed run sees exactly the batches an uninterrupted one does.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 epoch: int = 0, sampler=None):
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.sampler = seed, sampler
        self.slots = 0  # > 0: batch k goes to shared slot k % slots (see make_loader)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration is epoch ``epoch``'s, from its batch ``skip`` on (a run resumed inside an epoch)."""
        self.epoch, self.skip = epoch, skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def order(self) -> list[int]:
        if self.sampler is not None:
            return list(self.sampler)
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
                              ).tolist()

    def __iter__(self):
        order = self.order()
        for k, start in enumerate(range(0, len(order), self.batch_size)):
            if k < self.skip:
                continue
            indices = order[start: start + self.batch_size]
            if self.drop_last and len(indices) < self.batch_size:
                return
            seed = int(np.random.SeedSequence([self.seed, self.epoch, k]).generate_state(1)[0])
            batch = SeededBatch(indices, seed)
            if self.slots:
                batch.slot = k % self.slots
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else self.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def find_cache(dataset: Dataset, crop: str, min_size: int) -> ImageCache | None:
    """The smallest current cache whose images are at least ``min_size`` on their shorter side."""
    sizes = []
    for path in (dataset.root / "cache").glob(f"*px-{crop}"):
        try:
            size = int(path.name.split("px-")[0])
        except ValueError:
            continue
        if size >= min_size and path == cache_dir(dataset, size, crop):
            sizes.append(size)
    for size in sorted(sizes):
        try:
            return ImageCache(dataset, size, crop)
        except (DogkitError, OSError, ValueError):  # stale or unreadable: fall back to decoding
            continue
    return None


def _seed_worker(worker_id: int) -> None:
    # Augmentations are seeded per batch (SeededBatch); global streams follow torch's per-worker seed, for
    # any transform that draws from them. Threads: torch runs one per worker already. OpenCV's count is
    # left alone: cv2.setNumThreads in a forked worker deadlocks once the parent has used OpenCV's pool.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _collate(data):
    return data if isinstance(data, RingBatch) else default_collate(data)


class _Loader(DataLoader):
    """Turns the ring's slot numbers back into batches (views of the shared slots) in the main process."""

    def __iter__(self):
        for item in super().__iter__():
            if isinstance(item, RingBatch):
                slot, size, labels = item
                yield self.dataset.ring[slot, :size], torch.tensor(labels)
            else:
                yield item


def make_loader(images: ManifestImages, batch_size: int, *, shuffle: bool, workers: int | None, seed: int = 0,
                epoch: int = 0, pin_memory: bool = False, drop_last: bool = False, sampler=None,
                persistent: bool = False) -> DataLoader:
    """A loader whose order and augmentations depend only on (seed, epoch), so resume is exact.

    ``persistent=True`` keeps the worker processes between epochs: reuse the loader and call
    ``loader.batch_sampler.set_epoch(epoch)`` before each epoch. Its workers (when the batches are not
    pinned for a GPU) then write into a ring of shared-memory slots allocated once, instead of a new
    shared-memory block per batch, whose allocation, page faults and file-descriptor passing cost one
    worker more than the augmentation itself here. A batch from such a loader is valid until the
    next-but-one batch is fetched (the training loop's case); copy it to keep it longer.
    """
    workers = min(available_cpus(), 8) if workers is None else workers
    batches = SeededBatchSampler(len(images), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                                 epoch=epoch, sampler=sampler)
    prefetch = 4
    images.ring = None
    if persistent and workers and not pin_memory and len(images):
        # Slot k % slots: at most workers × prefetch batches are in flight beyond the one being used, so
        # two more slots keep the current and the previous batch intact.
        batches.slots = workers * prefetch + 2
        first = images[0][0]  # every batch has this shape (square crops); seeds are per batch, so no RNG is shifted
        images.ring = torch.empty((batches.slots, batch_size, *first.shape), dtype=first.dtype).share_memory_()
    # The workers' base seed comes from a generator of the loader's own: drawn from torch's global one, it would
    # shift the dropout stream by one draw per new iterator, which persistent workers make once per run, not
    # once per epoch (so a resumed run would draw one more than an uninterrupted one).
    generator = torch.Generator().manual_seed(seed)
    return _Loader(
        images, batch_sampler=batches, num_workers=workers, worker_init_fn=_seed_worker if workers else None,
        generator=generator,
        pin_memory=pin_memory, persistent_workers=persistent and workers > 0, collate_fn=_collate,
        prefetch_factor=prefetch if workers else None,
    )
