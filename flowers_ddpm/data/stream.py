"""Training data: a streamed `datasets` source -> resumable shuffled example stream -> decoded batches.

Order of examples is decided in one place (`ResumableStream`, on the main thread of each process) and the
decode threads are pure functions of (record, key). That is what makes resume exact: a checkpoint stores, as of
the last example the trainer consumed, the epoch and position of an exactly shuffled epoch, or, for a stream
longer than the shuffle buffer, the stream position of `datasets` (its `state_dict`), the contents of our shuffle
buffer (raw records: file paths or encoded bytes, never decoded pixels) and the shuffle RNG.
`datasets`' own `shuffle()` is not used because its buffer's contents are not part of its state_dict.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from datasets import ClassLabel, Image, IterableDatasetDict, concatenate_datasets, load_dataset
from datasets.distributed import split_dataset_by_node

from ..config.sections import FLOWERS_DATASET, DataSettings
from ..errors import UserError
from .decode_pool import decode_in_order
from .flowers102 import display_names
from .imaging import IMAGE_EXTENSIONS, TransformSettings, try_decode

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


@dataclass
class DataSource:
    """A streamed dataset of raw (undecoded) image records plus what we know about it."""

    dataset: "datasets.IterableDataset"  # noqa: F821
    image_column: str
    label_column: Optional[str]
    class_names: Optional[list[str]]
    num_examples: Optional[int]
    description: str
    held_out: frozenset = frozenset()  # ids of examples removed from this source (see `hold_out`)


def count_local_images(folder: str) -> int:
    """Number of image files below `folder` (what the imagefolder loader will stream)."""
    return sum(
        1 for _, _, files in os.walk(folder) for name in files if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def detect_image_column(features, requested: Optional[str]) -> str:
    """The requested image column, or the first column of type Image, or a column called image/img."""
    names = list(features)
    if requested:
        if requested not in names:
            raise UserError(f"image_column {requested!r} is not in the dataset; columns are {', '.join(names)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, Image):
            return name
    for name in ("image", "img", "images", "picture"):
        if name in names:
            return name
    raise UserError(f"no image column found among {', '.join(names)}; pass --image_column")


def detect_label_column(features) -> Optional[str]:
    """The first ClassLabel column (or a column named label), else None."""
    for name, feature in features.items():
        if isinstance(feature, ClassLabel):
            return name
    return "label" if "label" in features else None


def _load_streaming(data: DataSettings):
    if data.train_data_dir:
        if count_local_images(data.train_data_dir) == 0:
            raise UserError(
                f"train_data_dir {data.train_data_dir} contains no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        return load_dataset("imagefolder", data_dir=data.train_data_dir, streaming=True, cache_dir=data.cache_dir)
    try:
        return load_dataset(data.dataset_name, data.dataset_config_name, streaming=True, cache_dir=data.cache_dir)
    except ConnectionError:
        raise UserError(
            f"cannot reach the Hugging Face Hub to stream {data.dataset_name}; to train without network, "
            "pass --train_data_dir PATH with a folder of images (sub-folders as classes)"
        ) from None
    except FileNotFoundError as e:
        raise UserError(f"dataset {data.dataset_name} not found: {str(e).splitlines()[0]}") from None


def open_source(data: DataSettings) -> DataSource:
    """Open the configured dataset for streaming; nothing is downloaded beyond metadata."""
    loaded = _load_streaming(data)
    if isinstance(loaded, IterableDatasetDict):
        if data.dataset_split == "all":
            splits = list(loaded)
            dataset = concatenate_datasets([loaded[s] for s in splits]) if len(splits) > 1 else loaded[splits[0]]
        elif data.dataset_split in loaded:
            splits, dataset = [data.dataset_split], loaded[data.dataset_split]
        else:
            raise UserError(f"dataset_split must be 'all' or one of {', '.join(loaded)}; got {data.dataset_split!r}")
    else:
        splits, dataset = [data.dataset_split], loaded
    features = dataset.features
    if features is None:
        raise UserError("the dataset does not declare its columns; pass a dataset with features or a local folder")
    image_column = detect_image_column(features, data.image_column)
    label_column = detect_label_column(features)
    class_names = getattr(features.get(label_column), "names", None) if label_column else None
    columns = [image_column] + ([label_column] if label_column else [])
    dataset = dataset.select_columns(columns).cast_column(image_column, Image(decode=False))

    if data.train_data_dir:
        num_examples = count_local_images(data.train_data_dir)
        description = f"local folder {data.train_data_dir}"
    else:
        info_splits = getattr(getattr(loaded, "info", None) or dataset.info, "splits", None) or {}
        sizes = [info_splits[s].num_examples for s in splits if s in info_splits]
        num_examples = sum(sizes) if sizes and len(sizes) == len(splits) else None
        description = f"{data.dataset_name} ({'+'.join(splits)})"
        if data.dataset_name == FLOWERS_DATASET and class_names:
            class_names = display_names(class_names)
    return DataSource(dataset, image_column, label_column, class_names, num_examples, description)


def class_balanced_ids(source: DataSource, max_images: int, seed: Optional[int] = None,
                       max_share: float = 1.0) -> set[str]:
    """The ids of up to `max_images` examples, as many of each class as the data allow, so a score on them is not
    dominated by the classes listed first. Without `seed`, the first ones of each class in stream order; with it, a
    seeded choice among the first four times as many of each class (the same ids on every process and every run
    with that seed). At most `max_share` of a class's examples are taken when it has fewer than that pool. Reads
    only labels and records (no decoding), until every class has its pool."""
    num_classes = len(source.class_names)
    quota = [max_images // num_classes + (c < max_images % num_classes) for c in range(num_classes)]
    pool_size = quota if seed is None else [4 * q for q in quota]
    pools: list[list[str]] = [[] for _ in range(num_classes)]
    missing = sum(pool_size)
    for example in source.dataset:
        label = example[source.label_column]
        if missing and len(pools[label]) < pool_size[label]:
            pools[label].append(example_id(example[source.image_column]))
            missing -= 1
        if not missing:
            break
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for c, pool in enumerate(pools):
        share = quota[c] if len(pool) == pool_size[c] else min(quota[c], int(len(pool) * max_share))
        order = range(len(pool)) if seed is None else rng.permutation(len(pool))
        chosen.update(pool[i] for i in list(order)[:share])
    return chosen


def hold_out(source: DataSource, num_images: int, seed: int) -> DataSource:
    """The source without a class-balanced, seeded sample of about `num_images` examples (at most half of a small
    class), for a score on images the model never trained on when the data has only one split. The sample's ids
    are the result's `held_out`; the same seed holds out the same images on every process and after a resume."""
    ids = frozenset(class_balanced_ids(source, num_images, seed, max_share=0.5))
    column = source.image_column
    dataset = source.dataset.filter(lambda example: example_id(example[column]) not in ids)
    count = None if source.num_examples is None else source.num_examples - len(ids)
    return dataclasses.replace(source, dataset=dataset, num_examples=count, held_out=ids,
                               description=f"{source.description} without {len(ids)} held-out images")


def example_id(record) -> str:
    """A stable identifier of a raw image record: its file path, or a hash of its bytes."""
    if isinstance(record, dict) and record.get("path") and record.get("bytes") is None:
        return record["path"]
    data = record.get("bytes") if isinstance(record, dict) else record
    name = record.get("path") if isinstance(record, dict) else None
    digest = hashlib.sha1(data).hexdigest()[:16]
    return f"{name}#{digest}" if name else f"sha1:{digest}"


_EPOCH_END = object()  # marks the end of each epoch in ResumableStream._epoch_examples


class ResumableStream:
    """Endless stream of raw examples for one process: this process's shard (`split_dataset_by_node`), per-epoch
    shard order (datasets' `set_epoch`), shuffled in one of two ways, chosen by the size of the first epoch:

    - an epoch of at most `buffer_size` examples is **shuffled exactly**: it is read whole (raw records: paths or
      encoded bytes) and handed out in a fresh permutation each epoch, `default_rng([seed, rank, epoch])`. The state
      is then just (epoch, position): a resumed stream reads the epoch again and draws the same permutation.
    - a longer stream goes through a **shuffle buffer** of `buffer_size` examples: each new example replaces a
      random one, which is handed out. The state holds the buffer's records and its RNG.

    Why not the buffer alone: a local folder streams as one shard in file order, that is sorted by class, and a
    buffer smaller than an epoch over a class-sorted stream hands out batches skewed toward the classes read last,
    several times over the rarest (docs/training.md, "Data order"). `buffer_size` 1 keeps the stream's order.

    `state_dict()` taken right after an example was yielded resumes with the next example exactly.
    """

    def __init__(self, dataset, seed: int, buffer_size: int, rank: int = 0, world_size: int = 1):
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset
        self.seed, self.rank, self.world_size, self.buffer_size = seed, rank, world_size, buffer_size
        self.epoch = 0
        self.buffer: list = []
        self.rng = np.random.default_rng([seed, rank])
        self.produced = 0  # examples yielded so far; also the augmentation key of the next example
        self.epoch_size: Optional[int] = None  # examples in one epoch of this process's shard, once one was read
        self.exact: Optional[bool] = None  # exact per-epoch shuffle (True) or buffer (False); None until decided
        self.position = 0  # examples of the current epoch handed out, when shuffling exactly
        self._resumed = False  # a resumed epoch may have nothing left in it; a fresh one may not

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "produced": self.produced,
            "epoch_size": self.epoch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "exact": self.exact,
            "position": self.position,
            "buffer": list(self.buffer),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
        }
        # (an exact shuffle re-reads its epoch from the start, so the datasets position is not needed to resume;
        # the key stays, as TrainBatches tells a stream state from a decode-cache state by it)
        state["dataset"] = None if self.exact else self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.produced = state["epoch"], state["produced"]
        self.epoch_size = state.get("epoch_size")
        self.exact = state.get("exact", False)  # states written before the exact shuffle used the buffer
        self.position = state.get("position", 0)
        self.buffer = list(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        if not self.exact:
            self.dataset.load_state_dict(state["dataset"])
            self._resumed = True

    def _epoch_examples(self) -> Iterator:
        """The examples of epoch after epoch, each epoch followed by _EPOCH_END."""
        while True:
            self.dataset.set_epoch(self.epoch)
            fresh, self._resumed = not self._resumed, False
            seen = 0
            for example in self.dataset:
                seen += 1
                yield example
            if seen == 0 and fresh:
                raise UserError(f"the dataset yielded no examples for process {self.rank} of {self.world_size}")
            if fresh:
                self.epoch_size = seen
            self.epoch += 1
            yield _EPOCH_END

    def _read_epoch(self) -> list:
        self.dataset.set_epoch(self.epoch)
        return list(self.dataset)

    def _exactly_shuffled(self, records: Optional[list] = None) -> Iterator[dict]:
        """Epoch after epoch in a seeded permutation, from `position` of the current epoch (`records`: the
        current epoch's, when already read)."""
        while True:
            records = self._read_epoch() if records is None else records
            order = np.random.default_rng([self.seed, self.rank, self.epoch]).permutation(len(records))
            while self.position < len(records):
                out = records[order[self.position]]
                self.position += 1
                self.produced += 1
                yield out
            self.epoch, self.position, records = self.epoch + 1, 0, None

    def __iter__(self) -> Iterator[dict]:
        if self.exact:
            yield from self._exactly_shuffled()
            return
        for example in self._epoch_examples():
            if example is _EPOCH_END:
                # the whole first epoch fit in the buffer: shuffle it exactly from now on
                if self.exact is None and self.buffer:
                    self.exact, records, self.buffer = True, self.buffer, []
                    self.epoch, self.position, self.epoch_size = self.epoch - 1, 0, len(records)
                    yield from self._exactly_shuffled(records)
                    return
                continue
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(example)
                continue
            self.exact = False
            i = int(self.rng.integers(self.buffer_size))
            out, self.buffer[i] = self.buffer[i], example
            self.produced += 1
            yield out


class TrainBatches:
    """Decoded, batched examples for one process, in the stream's order.

    Records are decoded by `num_workers` threads (inline when 0) a bounded window ahead of the trainer.
    Unreadable files are skipped (each warned once, counted once) without shortening a batch. `state_dict()` is
    the stream state as of the last example of the last batch handed out, so a checkpoint never loses or repeats
    data; it also carries the number of images decoded and the unreadable files found so far, so that "none of
    the images could be read" (raised only once every example of this process's shard was tried and none decoded)
    and the count of skipped files survive a resume.
    """

    def __init__(self, stream: ResumableStream, source: DataSource, settings: TransformSettings, batch_size: int,
                 num_workers: int = 0, record_ids: bool = False):
        self.stream, self.source, self.settings = stream, source, settings
        self.batch_size, self.num_workers, self.record_ids = batch_size, num_workers, record_ids
        self.consumed_state = stream.state_dict()
        self._unreadable: list[str] = []  # ids of the files that could not be decoded, each once, in order found
        self._unreadable_set: set[str] = set()
        self._warned: set[str] = set()
        self._decoded_ok = 0
        self._consumed_counts = (0, 0)  # (images decoded, unreadable files) as of consumed_state

    @property
    def skipped(self) -> int:
        """Unreadable files found so far (each counted once, however often it was drawn)."""
        return len(self._unreadable)

    def state_dict(self) -> dict:
        decoded, unreadable = self._consumed_counts
        return {**self.consumed_state, "images_decoded": decoded, "unreadable": self._unreadable[:unreadable]}

    def load_state_dict(self, state: dict) -> None:
        if "dataset" not in state:  # written by the decode-cache path (flowers_ddpm.data.cache)
            logger.warning("the checkpoint's data position belongs to the decode cache; the data stream restarts")
            return
        self.stream.load_state_dict(state)
        # a checkpoint is only written after a batch was decoded (older checkpoints lack the count)
        self._decoded_ok = max(1, int(state.get("images_decoded", 1)))
        self._unreadable = list(state.get("unreadable", []))
        self._unreadable_set = set(self._unreadable)
        self._consumed_counts = (self._decoded_ok, len(self._unreadable))
        self.consumed_state = {k: v for k, v in state.items() if k not in ("images_decoded", "unreadable")}

    def _jobs(self):
        """(record, label, stream state after it) and the arguments of its `try_decode`, in stream order."""
        image_col, label_col = self.source.image_column, self.source.label_column
        for example in self.stream:
            record, label = example[image_col], (example[label_col] if label_col else -1)
            key = (self.stream.seed, self.stream.rank, self.stream.produced - 1)
            yield (record, label, self.stream.state_dict()), (record, self.settings, key)

    def _decoded(self):
        window = max(2 * self.batch_size, 4 * self.num_workers)
        for (record, label, state), decoded in decode_in_order(try_decode, self._jobs(), self.num_workers, window):
            yield record, label, state, decoded

    def _check_bad(self, record, reason: str) -> None:
        name = example_id(record)
        if name not in self._warned:
            self._warned.add(name)
            if name not in self._unreadable_set:  # (found before a resume: already counted)
                self._unreadable_set.add(name)
                self._unreadable.append(name)
            logger.warning("skipping unreadable image %s (%s)", name, reason)
        size = self.stream.epoch_size
        if self._decoded_ok == 0 and size is not None and len(self._unreadable) >= size:
            raise UserError(f"none of the images in {self.source.description} could be read")

    def __iter__(self):
        images, labels, ids = [], [], []
        for record, label, state, (array, reason) in self._decoded():
            if array is None:
                self._check_bad(record, reason)
                continue
            self._decoded_ok += 1
            images.append(array)
            labels.append(label)
            if self.record_ids:
                ids.append(example_id(record))
            if len(images) == self.batch_size:
                pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
                batch = {
                    "pixel_values": pixels.float().div_(127.5).sub_(1.0),
                    "class_labels": torch.tensor(labels, dtype=torch.long),
                    "ids": ids,
                }
                self.consumed_state = state
                self._consumed_counts = (self._decoded_ok, len(self._unreadable))
                images, labels, ids = [], [], []
                yield batch


def build_train_batches(data: DataSettings, source: DataSource, rank: int, world_size: int, batch_size: int,
                        seed: int, log_data_order: bool = False, jpeg_draft: bool = True) -> TrainBatches:
    """The training batches of process `rank` out of `world_size` (`jpeg_draft`: see TransformSettings)."""
    stream = ResumableStream(source.dataset, seed, data.shuffle_buffer_size, rank, world_size)
    settings = TransformSettings(data.resolution, data.center_crop, data.random_flip, jpeg_draft)
    return TrainBatches(stream, source, settings, batch_size, data.dataloader_num_workers, log_data_order)
