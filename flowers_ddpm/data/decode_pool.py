"""Decoding a stream of images on worker threads, a bounded window ahead of the consumer, results in stream order.

Used by the training stream (data/stream.py) and the decode-cache build (data/cache.py). Pillow releases the GIL
while decoding and resizing, so threads scale; the window keeps only a few batches of records in memory however
long (or endless) the stream is.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator


def decode_in_order(decode: Callable, jobs: Iterable[tuple[Any, tuple]], num_workers: int, window: int,
                    thread_name_prefix: str = "decode") -> Iterator[tuple[Any, Any]]:
    """For each `(context, args)` of `jobs`, yield `(context, decode(*args))` in the order of `jobs`: inline when
    `num_workers` is 0, else on `num_workers` threads with at most `window` jobs submitted and not yet yielded."""
    if num_workers == 0:
        for context, args in jobs:
            yield context, decode(*args)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(num_workers, thread_name_prefix=thread_name_prefix) as pool:
        for context, args in jobs:
            pending.append((context, pool.submit(decode, *args)))
            if len(pending) >= window:
                context, future = pending.popleft()
                yield context, future.result()
        for context, future in pending:
            yield context, future.result()
