"""The decode pool every deploy command shares: images decoded and preprocessed in threads, within the decode
budget (``dogkit.data.budget``), while the caller runs the previous batch.

An image that cannot be used costs that image, not the batch: ``load_or_reason`` turns it into its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import cv2
import numpy as np

from ..data.budget import Budget, budget_bytes
from ..data.images import ImageError
from ..system import available_cpus

T = TypeVar("T")


def load_or_reason(load: Callable[[T], np.ndarray], item: T) -> np.ndarray | str:
    """The loaded image, or the reason it cannot be used: an odd image costs that image, not the batch."""
    try:
        return load(item)
    except ImageError as e:
        return e.reason
    except cv2.error as e:
        return f"cannot preprocess ({str(e).strip().splitlines()[-1][:200]})"
    except MemoryError:
        return "not enough memory to decode it"


def iter_batches(items: list[T], load: Callable[[T], np.ndarray], batch_size: int, workers: int | None = None,
                 cost: Callable[[T], int] | None = None, budget: Budget | None = None
                 ) -> Iterator[tuple[list[T], np.ndarray, list[tuple[T, str]]]]:
    """(items, uint8 batch, failures) per batch; the next batch decodes while the caller runs this one. With
    ``cost`` (bytes an item holds while it loads, e.g. ``file_cost``), loads run within ``budget`` (default: the
    decode budget), so peak memory follows the budget whatever the images' sizes."""
    chunks = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    budget = budget or (Budget(budget_bytes()) if cost is not None else None)

    def safe(item: T) -> np.ndarray | str:
        if budget is None:
            return load_or_reason(load, item)
        with budget.held(cost(item)):
            return load_or_reason(load, item)

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallelism comes from the pool
    try:
        with ThreadPoolExecutor(workers or available_cpus()) as pool:
            pending: list[Future] = [pool.submit(safe, x) for x in chunks[0]] if chunks else []
            for k, chunk in enumerate(chunks):
                current = pending
                pending = [pool.submit(safe, x) for x in chunks[k + 1]] if k + 1 < len(chunks) else []
                good, images, failed = [], [], []
                for item, future in zip(chunk, current):
                    result = future.result()
                    if isinstance(result, str):
                        failed.append((item, result))
                    else:
                        good.append(item)
                        images.append(result)
                yield good, np.stack(images) if images else None, failed
    finally:
        cv2.setNumThreads(previous)
