"""Reference features of real images, computed once per (dataset, split, resolution, crop, feature network) and
cached on disk under a key of exactly those settings, so any change computes a new entry.

Real images go through the same path as training data (`data.open_source` + `imaging.decode_and_transform`),
without flips. A random crop (`--no-center_crop`) is drawn from a fixed key per example, so it is reproducible.
Work is split across processes (each reads its shard of the stream) and the features are gathered and sorted by
example id, so the cached entry does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate.utils import gather_object
from datasets.distributed import split_dataset_by_node
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._util.atomic import atomic_file, atomic_write_text
from .._util.cache import cache_location, folder_fingerprint, identity_key
from .._util.distributed import gather_rows, together
from ..config.sections import DataSettings
from ..data.imaging import TransformSettings, try_decode
from ..data.stream import class_balanced_ids, example_id, open_source
from ..errors import UserError
from .features import fingerprint

logger = logging.getLogger(__name__)


def reference_key(data: DataSettings, network_fingerprints: list[str], max_images: Optional[int]) -> dict:
    """Everything the reference features depend on."""
    if data.train_data_dir:
        source = {"train_data_dir": str(Path(data.train_data_dir).resolve()),
                  "content": folder_fingerprint(data.train_data_dir)}
    else:
        source = {"dataset_name": data.dataset_name, "dataset_config_name": data.dataset_config_name}
    return {**source, "split": data.dataset_split, "image_column": data.image_column, "resolution": data.resolution,
            "crop": "center" if data.center_crop else "random(seeded)", "max_images": max_images,
            "networks": network_fingerprints}


def real_image_batches(data: DataSettings, rank: int, world_size: int, batch_size: int, max_images: Optional[int],
                       class_balanced: bool = False, only: Optional[frozenset] = None):
    """Yield (ids, uint8 NCHW tensor, class labels (-1 without a label column)) of this process's share of the
    real images; unreadable files are skipped. `max_images`: the first ones, or with `class_balanced` (data with
    classes) an equal number of each class; `only`: exactly the examples with these ids."""
    source = open_source(data)
    dataset = source.dataset
    if only is not None:
        dataset = dataset.filter(lambda example: example_id(example[source.image_column]) in only)
    elif max_images and class_balanced and source.label_column and source.class_names:
        chosen = class_balanced_ids(source, max_images)
        dataset = dataset.filter(lambda example: example_id(example[source.image_column]) in chosen)
    elif max_images:
        dataset = dataset.take(max_images)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    settings = TransformSettings(data.resolution, data.center_crop, random_flip=False)
    ids, arrays, labels = [], [], []
    for example in dataset:
        record = example[source.image_column]
        name = example_id(record)
        key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")
        array, reason = try_decode(record, settings, (0, key))
        if array is None:
            logger.warning("skipping unreadable reference image %s (%s)", name, reason)
            continue
        ids.append(name)
        arrays.append(array)
        labels.append(example[source.label_column] if source.label_column else -1)
        if len(arrays) == batch_size:
            yield ids, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), torch.tensor(labels)
            ids, arrays, labels = [], [], []
    if arrays:
        yield ids, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), torch.tensor(labels)


def compute_reference(accelerator, data: DataSettings, networks: dict, batch_size: int,
                      max_images: Optional[int]) -> dict[str, dict]:
    """Features of the real images for each network ({name: {'features', 'logits'?}}), on every process."""
    outputs: dict[str, dict[str, list]] = {name: {} for name in networks}
    all_ids: list[str] = []
    with tqdm(desc="reference features", unit="img", disable=not accelerator.is_local_main_process) as bar:
        for ids, images, _ in real_image_batches(data, accelerator.process_index, accelerator.num_processes,
                                              batch_size, max_images):
            images = images.to(accelerator.device)
            for name, network in networks.items():
                for kind, value in network(images).items():
                    outputs[name].setdefault(kind, []).append(value.float().cpu())
            all_ids += ids
            bar.update(len(ids) * accelerator.num_processes)
    if not all_ids:  # this process's shard was empty: contribute zero rows of the right width
        probe = torch.zeros(1, 3, data.resolution, data.resolution, dtype=torch.uint8, device=accelerator.device)
        for name, network in networks.items():
            outputs[name] = {kind: [value.float().cpu()[:0]] for kind, value in network(probe).items()}

    gathered_ids = gather_object(all_ids) if accelerator.num_processes > 1 else all_ids
    if not gathered_ids:
        raise UserError(f"no reference image could be read from {data.train_data_dir or data.dataset_name}")
    order = torch.as_tensor(np.argsort(np.asarray(gathered_ids), kind="stable"))
    return {name: {kind: gather_rows(accelerator, torch.cat(values))[order] for kind, values in kinds.items()}
            for name, kinds in outputs.items()}


def load_or_compute_reference(accelerator, data: DataSettings, networks: dict, cache_dir: Optional[str] = None,
                              batch_size: int = 64, max_images: Optional[int] = None) -> dict[str, dict]:
    """Reference features for `networks` ({name: module}): one cache entry per network, the missing ones computed
    together in one pass over the data and cached."""
    root = cache_location("reference", cache_dir)
    keys = {name: reference_key(data, [fingerprint(network)], max_images) for name, network in networks.items()}
    files = {name: root / f"{identity_key(key)}.safetensors" for name, key in keys.items()}
    result = {name: load_file(str(files[name])) for name in networks if files[name].is_file()}
    for name in result:
        logger.info("%s reference features from cache %s", name, files[name])
    missing = {name: network for name, network in networks.items() if name not in result}
    if missing:
        computed = compute_reference(accelerator, data, missing, batch_size, max_images)
        with together(accelerator):  # a cache the disk refuses stops every process, with one line
            if accelerator.is_main_process:
                for name, features in computed.items():
                    _save_entry(files[name], keys[name], features)
        result.update(computed)
    return result


def _save_entry(tensors_file: Path, key: dict, features: dict) -> None:
    tensors_file.parent.mkdir(parents=True, exist_ok=True)
    num_images = len(features["features"])
    atomic_write_text(tensors_file.with_suffix(".json"), json.dumps({**key, "num_images": num_images}, indent=2))
    with atomic_file(tensors_file) as tmp:  # the features last: a crash never leaves an entry that looks complete
        save_file({kind: value.contiguous() for kind, value in features.items()}, str(tmp))
    logger.info("cached %d reference features in %s", num_images, tensors_file)
