"""Test beds of the recipe ablation: small real labelled image sets written as class folders, and a small
classifier trained on each to score samples with.

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to RGB (installs offline; 20% held out at
  random).
- `cifar10-5k`: real 32x32 colour photographs from an `.npz` file given by path (`images` (N, H, W, 3) uint8,
  `labels` (N,) ints, `class_names` (C,) str), e.g. the project's 5,085 CIFAR-10 images; a fixed class-balanced
  10% is held out. The data is read where it lies, never copied into the repository.

No pretrained network exists for these beds' features, so `BedClassifier` is trained here (seconds to a minute on a
CPU) and cached; its held-out accuracy is reported with every ablation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)

CLASSIFIER_VERSION = 2  # bump when the classifier's architecture or training changes (invalidates caches)
# 2: the initial weights are drawn from the seed too (in version 1 they came from whatever the process's global RNG
#    held, so two ablation runs with the same seed and data could train different judges)


@dataclass(frozen=True)
class BedSpec:
    """How a bed is read and split."""

    name: str
    test_fraction: float
    class_balanced: bool  # hold out the same fraction of every class (else a random fraction of all images)
    random_flip: bool  # natural images are mirror-symmetric in distribution; digits are not
    needs_path: bool


BEDS = {
    "digits": BedSpec("digits", test_fraction=0.2, class_balanced=False, random_flip=False, needs_path=False),
    "cifar10-5k": BedSpec("cifar10-5k", test_fraction=0.1, class_balanced=True, random_flip=True, needs_path=True),
}


@dataclass
class BedData:
    """A bed written as class folders: `train_dir` (diffusion training and Frechet reference), `test_dir` (held out:
    the real-vs-real baseline and the classifier's accuracy). Sub-folders are `<index>` or `<index>_<name>`."""

    name: str
    train_dir: Path
    test_dir: Path
    resolution: int
    num_classes: int
    random_flip: bool


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits data needs scikit-learn: pip install 'flowers-ddpm[recipes]'") from None
    digits = load_digits()
    gray = np.uint8(np.round(digits.images * (255 / 16)))  # (1797, 8, 8) in 0..16
    return np.repeat(gray[..., None], 3, axis=3), digits.target, [str(i) for i in range(10)]


def _load_npz(path: Optional[str | Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if path is None or not Path(path).is_file():
        raise UserError(f"this bed reads an .npz file given by --bed_path; got {path}")
    with np.load(path) as data:
        missing = {"images", "labels", "class_names"} - set(data.files)
        if missing:
            raise UserError(f"{path} lacks {', '.join(sorted(missing))} (needs images, labels, class_names)")
        images, labels, names = data["images"], data["labels"].astype(np.int64), [str(n) for n in data["class_names"]]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise UserError(f"{path}: images must be (N, H, W, 3) uint8; got {images.shape} {images.dtype}")
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= len(names):
        raise UserError(f"{path}: labels must be one class index in 0..{len(names) - 1} per image")
    return images, labels, names


def _split(labels: np.ndarray, spec: BedSpec, seed: int) -> np.ndarray:
    """A boolean mask of the held-out images (fixed by the seed)."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(labels), dtype=bool)
    if spec.class_balanced:
        for c in np.unique(labels):
            members = rng.permutation(np.nonzero(labels == c)[0])
            held_out[members[:int(round(len(members) * spec.test_fraction))]] = True
    else:  # the digits bed's original split: the first fraction of one permutation
        order = rng.permutation(len(labels))
        held_out[order[:int(round(len(labels) * spec.test_fraction))]] = True
    return held_out


def _to_image(array: np.ndarray, resolution: int) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(array))
    return image if image.size == (resolution, resolution) else image.resize((resolution, resolution), Image.BICUBIC)


def write_bed(name: str, folder: str | Path, resolution: int = 32, seed: int = 0,
              path: Optional[str | Path] = None) -> BedData:
    """Write bed `name` as `folder/{train,test}/<class>/<index>.png` (once; reused when already complete)."""
    if name not in BEDS:
        raise UserError(f"unknown bed {name!r}; beds: {', '.join(BEDS)}")
    spec = BEDS[name]
    images, labels, class_names = _load_npz(path) if spec.needs_path else _load_digits()
    folder = Path(folder)
    data = BedData(name, folder / "train", folder / "test", resolution, len(class_names), spec.random_flip)
    marker = folder / "COMPLETE.json"
    settings = {"bed": name, "resolution": resolution, "test_fraction": spec.test_fraction, "seed": seed,
                "source": str(Path(path).resolve()) if path else None, "count": int(len(images))}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return data
    held_out = _split(labels, spec, seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        sub = str(label) if class_names[label] == str(label) else f"{label}_{class_names[label]}"
        target = (data.test_dir if held_out[index] else data.train_dir) / sub
        target.mkdir(parents=True, exist_ok=True)
        _to_image(image, resolution).save(target / f"{index:05d}.png")
    marker.write_text(json.dumps(settings))
    return data


def load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a class folder as uint8 NCHW plus their integer labels (class = the sub-folder's index)."""
    images, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(int(class_dir.name.split("_")[0]))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


class BedClassifier(nn.Module):
    """A small CNN; `features` (2 * width, before the linear head) is the space the Frechet distance is computed in."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    @staticmethod
    def _normalise(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """64-d features of uint8 NCHW images."""
        return self.body(self._normalise(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _augmented(images: torch.Tensor, generator: torch.Generator, flip: bool, max_shift: int = 2) -> torch.Tensor:
    """Random translations of up to `max_shift` pixels (so off-centre samples are still classified fairly), and
    horizontal flips for beds whose images are mirror-symmetric in distribution."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if flip and bool(torch.randint(0, 2, (1,), generator=generator)):
        images = images.flip(3)
    return images


def _fingerprint(train: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, flip: bool) -> str:
    digest = hashlib.sha256(train.numpy().tobytes() + labels.numpy().tobytes())
    settings = {"version": CLASSIFIER_VERSION, "epochs": epochs, "seed": seed}
    if flip:
        settings["flip"] = True
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def predict(model: BedClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted labels) of uint8 NCHW images."""
    model.eval()
    feats = [model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    features = torch.cat(feats)
    return features, model.head(features).argmax(dim=1)


def train_classifier(data: BedData, cache_dir: str | Path, epochs: int = 15, seed: int = 0) -> tuple[BedClassifier, float]:
    """The bed's classifier trained on the train split (cached by data + settings), and its held-out accuracy."""
    train, labels = load_folder(data.train_dir)
    test, test_labels = load_folder(data.test_dir)
    key = _fingerprint(train, labels, epochs, seed, data.random_flip)
    weights = Path(cache_dir) / f"{data.name}_classifier_{key}.safetensors"
    # the initial weights are part of the judge, so they come from the seed; fork_rng leaves the caller's global
    # random state as it was (the judge is scoring, not a step of anyone's experiment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BedClassifier(data.num_classes)
    if weights.is_file():
        model.load_state_dict(load_file(weights))
    else:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), 64):
                batch = order[start:start + 64]
                inputs = _augmented(train[batch], generator, data.random_flip)
                loss = nn.functional.cross_entropy(model(inputs), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), weights)
    accuracy = float((predict(model, test)[1] == test_labels).float().mean())
    logger.info("%s classifier: held-out accuracy %.3f (%s)", data.name, accuracy, weights)
    return model, accuracy
