"""Decode-once cache: every image of a source decoded, converted to RGB and resized once, stored as uint8 at
training resolution, then read by index with a seeded per-epoch permutation (only the random crop and flip
happen per step).

A cache folder ``<decode_cache_dir>/<key>/`` holds ``pixels.u8`` (all images back to back, HxWx3 uint8),
``index.npy`` (byte offset, height, width per image), ``labels.npy`` and ``meta.json`` (the identity the key was
hashed from, the example ids, the count of unreadable files). It is written as ``<key>.tmp-*`` and renamed when
complete, so a killed build is never read. The key covers the source (a local folder's file names, sizes and
modification times; a Hub dataset's name, config and size), the split, the image column, the resolution and the
crop mode, so a changed setting or a changed folder never reuses a stale cache.

Why our own format: `datasets` can cache decoded examples as Arrow, but reading a batch of random rows back as
arrays goes through per-row format conversion; a flat uint8 file indexed by offset gives zero-copy numpy views,
fits in RAM (Flowers102 at 64x64 is ~100 MB) or is memory-mapped when it does not.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .._util.atomic import atomic_folder
from .._util.cache import cache_location, folder_fingerprint, identity_key
from ..config.sections import DataSettings
from ..errors import UserError
from .decode_pool import decode_in_order
from .imaging import TransformSettings, crop_and_flip_view, decode_resized
from .stream import DataSource, example_id

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
STATE_KIND = "decode_cache"


def cache_identity(data: DataSettings, source: DataSource) -> dict:
    """Everything the cached pixels depend on."""
    identity = {"format": FORMAT_VERSION, "split": data.dataset_split, "image_column": source.image_column,
                "label_column": source.label_column, "resolution": data.resolution, "center_crop": data.center_crop}
    if data.train_data_dir:
        identity.update(source=str(Path(data.train_data_dir).resolve()), files=folder_fingerprint(data.train_data_dir))
    else:
        identity.update(source=data.dataset_name, config=data.dataset_config_name, num_examples=source.num_examples)
    if source.held_out:  # a source without a held-out sample caches only the rest
        identity["held_out"] = identity_key({"ids": sorted(source.held_out)})
    return identity


def cache_folder(data: DataSettings, source: DataSource) -> tuple[Path, dict]:
    """Where the cache for this config and source lives, and the identity it is keyed by."""
    identity = cache_identity(data, source)
    return cache_location("decoded", data.decode_cache_dir) / identity_key(identity), identity


def _decode(record, settings: TransformSettings):
    try:
        return decode_resized(record, settings), None
    except Exception as e:  # any decoder error means "skip this file"; Pillow raises many types
        return None, f"{type(e).__name__}: {e}"


def _decoded_in_order(source: DataSource, settings: TransformSettings, num_workers: int) -> Iterator[tuple]:
    """(record, label, (array | None, reason)) for every example of the source in stream order."""
    image_col, label_col = source.image_column, source.label_column
    examples = ((ex[image_col], ex[label_col] if label_col else -1) for ex in source.dataset)
    jobs = (((record, label), (record, settings)) for record, label in examples)
    # a bounded window: the records are not all held in memory
    for (record, label), decoded in decode_in_order(_decode, jobs, num_workers, 8 * num_workers, "cache-decode"):
        yield record, label, decoded


def build_cache(source: DataSource, settings: TransformSettings, folder: Path, identity: dict,
                num_workers: int = 0) -> Path:
    """Decode every example of `source` once into the cache folder `folder` (atomically); returns `folder`."""

    # a name of its own per process: several machines may build the same cache in a shared folder at once; the
    # first to finish wins (the content is identical)
    own_tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with atomic_folder(folder, own_tmp, keep_existing=True) as tmp:
        index, labels, ids, skipped, offset = [], [], [], 0, 0
        with open(tmp / "pixels.u8", "wb") as pixels, tqdm(total=source.num_examples, desc="decode cache",
                                                            unit="img", dynamic_ncols=True) as bar:
            for record, label, (array, reason) in _decoded_in_order(source, settings, num_workers):
                bar.update(1)
                if array is None:
                    skipped += 1
                    logger.warning("skipping unreadable image %s (%s)", example_id(record), reason)
                    continue
                pixels.write(array.tobytes())
                index.append((offset, array.shape[0], array.shape[1]))
                offset += array.nbytes
                labels.append(label)
                ids.append(example_id(record))
        if not index:
            raise UserError(f"none of the images in {source.description} could be read")
        np.save(tmp / "index.npy", np.asarray(index, dtype=np.int64))
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps({"identity": identity, "count": len(index), "skipped": skipped,
                                                   "ids": ids}))
    return folder


class DecodedImages:
    """A complete cache folder opened for reading: in RAM when it is at most `ram_limit_bytes`, else memory-mapped."""

    def __init__(self, folder: Path, ram_limit_bytes: int):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder, self.key = folder, folder.name
        self.ids, self.skipped = meta["ids"], meta["skipped"]
        self.index = np.load(folder / "index.npy")
        self.labels = np.load(folder / "labels.npy")
        path = folder / "pixels.u8"
        self.in_ram = path.stat().st_size <= ram_limit_bytes
        self.pixels = np.fromfile(path, dtype=np.uint8) if self.in_ram else np.memmap(path, np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def image(self, i: int) -> np.ndarray:
        """Image `i` as an HxWx3 uint8 view."""
        offset, h, w = (int(v) for v in self.index[i])
        return self.pixels[offset:offset + h * w * 3].reshape(h, w, 3)


def open_cache(data: DataSettings, source: DataSource, build: bool = True) -> DecodedImages:
    """The decode cache for this config and source, built first when it does not exist yet (and `build`)."""
    folder, identity = cache_folder(data, source)
    if not (folder / "meta.json").is_file():
        if not build:
            raise UserError(f"no decode cache at {folder}; run `flowers-ddpm prepare` with the same settings")
        logger.info("building the decode cache %s from %s", folder, source.description)
        settings = TransformSettings(data.resolution, data.center_crop, data.random_flip)
        build_cache(source, settings, folder, identity, data.dataloader_num_workers or min(8, os.cpu_count() or 1))
        logger.info("decode cache complete: %s", folder)
    images = DecodedImages(folder, data.decode_cache_ram_mb * 2**20)
    logger.debug("decode cache %s: %d images, %.1f MB %s", folder, len(images), images.nbytes / 2**20,
                "in RAM" if images.in_ram else "memory-mapped")
    return images


def _unit_range_table() -> np.ndarray:
    return torch.arange(256).float().div_(127.5).sub_(1.0).numpy()


_TO_UNIT_RANGE = _unit_range_table()


class CachedBatches:
    """Batches for one process read from a decode cache, in the DataStream protocol of the trainer.

    Epoch e visits the images in `default_rng([seed, e]).permutation(N)`; process r takes every world_size-th
    entry from r (the tail that does not divide evenly is dropped so every process has the same count). The crop
    and flip of image i in epoch e come from `default_rng([seed, e, i])`. So the state is just (epoch, position),
    and a resumed run reads exactly the batches the uninterrupted run would have read.
    """

    def __init__(self, images: DecodedImages, settings: TransformSettings, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, record_ids: bool = False):
        self.images, self.settings, self.batch_size = images, settings, batch_size
        self.seed, self.rank, self.world_size, self.record_ids = seed, rank, world_size, record_ids
        self.per_process = len(images) // world_size
        if self.per_process == 0:
            raise UserError(f"the decode cache has {len(images)} images, fewer than the {world_size} processes")
        self.epoch, self.position = 0, 0  # as of the last example of the last batch handed out
        self.skipped = images.skipped

    def state_dict(self) -> dict:
        return {"kind": STATE_KIND, "key": self.images.key, "epoch": self.epoch, "position": self.position,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND or state.get("key") != self.images.key:
            logger.warning("the checkpoint's data position belongs to another data path (decode cache switched on, "
                           "or its settings changed); the data order restarts")
            return
        self.epoch, self.position = state["epoch"], state["position"]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The cache indices this process visits in `epoch`, in order."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        return permutation[self.rank:self.per_process * self.world_size:self.world_size]

    def _positions(self) -> Iterator[tuple[int, int, int]]:
        epoch, start = self.epoch, self.position
        while True:
            order = self.epoch_order(epoch)
            for position in range(start, len(order)):
                yield epoch, position + 1, int(order[position])
            epoch, start = epoch + 1, 0

    def _augmented(self, epoch: int, i: int) -> np.ndarray:
        image = self.images.image(i)
        if self.settings.center_crop and not self.settings.random_flip:
            return image
        return crop_and_flip_view(image, self.settings, np.random.default_rng([self.seed, epoch, i]))

    def _pixels(self, chunk: list[tuple[int, int]]) -> np.ndarray:
        size = self.settings.resolution
        stacked = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
        for k, (epoch, i) in enumerate(chunk):
            stacked[k] = self._augmented(epoch, i)
        # one single-threaded table lookup maps uint8 to [-1, 1] (the same floats as the streaming path's
        # x.float() / 127.5 - 1); the NHWC result viewed as NCHW is already channels-last, without a copy
        return _TO_UNIT_RANGE[stacked]

    def __iter__(self):
        chunk: list[tuple[int, int]] = []
        for epoch, next_position, i in self._positions():
            chunk.append((epoch, i))
            if len(chunk) < self.batch_size:
                continue
            indices = [i for _, i in chunk]
            batch = {
                "pixel_values": torch.from_numpy(self._pixels(chunk)).permute(0, 3, 1, 2),
                "class_labels": torch.from_numpy(self.images.labels[indices]),
                "ids": [self.images.ids[i] for i in indices] if self.record_ids else [],
            }
            self.epoch, self.position = epoch, next_position
            chunk = []
            yield batch


def build_cached_batches(data: DataSettings, source: DataSource, rank: int, world_size: int, batch_size: int,
                         seed: int, log_data_order: bool = False) -> CachedBatches:
    """The training batches of process `rank` read from the (already built) decode cache."""
    images = open_cache(data, source, build=False)
    settings = TransformSettings(data.resolution, data.center_crop, data.random_flip)
    return CachedBatches(images, settings, batch_size, seed, rank, world_size, log_data_order)
