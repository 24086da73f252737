"""Evaluate a pipeline: generate on every process, extract features, gather them, compute the metrics, report.

Image i is drawn with generator seed + i (as in `flowers-ddpm sample`), and each process draws a contiguous block
of indices, so the images, and therefore the metrics, do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .._util.distributed import gather_rows
from .metrics import compute_metrics

# --compare_schedulers: the quality/speed trade-off users ask about, on the same model and seeds
SCHEDULER_COMPARISON = (("ddpm", 1000), ("ddim", 50), ("ddim", 25), ("dpmsolver++", 20), ("dpmsolver++", 10))
METRIC_COLUMNS = (("fid", "FID"), ("kid_mean", "KID"), ("is_mean", "IS"), ("precision", "precision"),
                  ("recall", "recall"), ("fd_dinov2", "FD-DINOv2"), ("images_per_sec", "images/s"))


@dataclass
class SamplingSettings:
    num_images: int
    scheduler: Optional[str]
    steps: int
    seed: int = 0
    batch_size: int = 16
    class_labels: Optional[list[int]] = None  # class-conditional models: image i is of class_labels[i % len]
    guidance_scale: Optional[float] = None  # classifier-free guidance (None: the pipeline's default, 1)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> uint8 (N, 3, H, W), the input every feature network takes."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def generated_features(accelerator, pipe, networks: dict, sampling: SamplingSettings) -> tuple[dict, float]:
    """Features of `num_images` generated images for each network, gathered on every process in image order,
    and the generation throughput (images/s over all processes, feature extraction excluded)."""
    from ..pipelines.sampling import generate

    indices = list(range(sampling.num_images))
    outputs: dict[str, dict[str, list]] = {name: {} for name in networks}
    seconds = 0.0
    with accelerator.split_between_processes(indices) as mine, \
            tqdm(total=len(mine), desc=f"generate {sampling.scheduler or 'default'}-{sampling.steps}", unit="img",
                 disable=not accelerator.is_local_main_process, leave=False) as bar:
        for start in range(0, len(mine), sampling.batch_size):
            block = mine[start:start + sampling.batch_size]
            began = time.perf_counter()
            images = generate(pipe, len(block), sampling.steps, sampling.seed + block[0], sampling.scheduler,
                              batch_size=len(block), class_labels=_block_labels(sampling.class_labels, block),
                              guidance_scale=sampling.guidance_scale)
            seconds += time.perf_counter() - began
            pixels = images_to_tensor(images).to(accelerator.device)
            for name, network in networks.items():
                for kind, value in network(pixels).items():
                    outputs[name].setdefault(kind, []).append(value.float().cpu())
            bar.update(len(block))
    slowest = gather_rows(accelerator, torch.tensor([seconds], dtype=torch.float64)).max().item()
    features = {name: {kind: gather_rows(accelerator, torch.cat(values)) for kind, values in kinds.items()}
                for name, kinds in outputs.items()}
    return features, sampling.num_images / max(slowest, 1e-9)


def _block_labels(class_labels: Optional[list[int]], block: list[int]) -> Optional[list[int]]:
    """The labels of the images in `block` (global indices), so labels cycle over all images, not per process."""
    if not class_labels:
        return None
    return [class_labels[i % len(class_labels)] for i in block]


def evaluation_labels(pipe, class_labels: Optional[list], guidance_scale: Optional[float]) -> Optional[list[int]]:
    """Class indices to evaluate with: the requested ones (indices or names), every class uniformly for a
    class-conditional pipeline given none, None for an unconditional pipeline (which takes neither option)."""
    from ..errors import UserError
    from ..pipelines.sampling import resolve_class_labels

    num_classes = getattr(pipe, "num_classes", None)
    if num_classes is None and guidance_scale is not None:
        raise UserError("--guidance_scale needs a class-conditional pipeline; this model is unconditional")
    labels = resolve_class_labels(pipe, class_labels)  # one-sentence errors for unknown labels or models
    if labels is None and num_classes is not None:
        labels = list(range(num_classes))
    return labels


def conditioning_record(pipe, labels: Optional[list[int]], guidance_scale: Optional[float]) -> Optional[dict]:
    """What metrics.json records about the labels the images were drawn with (None when unconditional)."""
    if labels is None:
        return None
    names = pipe.config.class_names
    return {"class_labels": labels, "class_names": [names[i] for i in labels] if names else None,
            "guidance_scale": 1.0 if guidance_scale is None else guidance_scale}


def evaluate_pipeline(accelerator, pipe, networks: dict, reference: dict, sampling: SamplingSettings,
                      with_precision_recall: bool = True) -> dict:
    """One row of results: sampler settings, throughput and every metric the given networks allow."""
    original = pipe.scheduler
    # "DDPM-1000" means the full chain: a model trained with fewer timesteps cannot take more sampler steps
    sampling = dataclasses.replace(sampling, steps=min(sampling.steps, original.config.num_train_timesteps))
    try:
        fake, images_per_sec = generated_features(accelerator, pipe, networks, sampling)
    finally:
        pipe.scheduler = original  # the next comparison starts from the pipeline's own scheduler config
    row = {"scheduler": sampling.scheduler or type(original).__name__, "steps": sampling.steps,
           "num_images": sampling.num_images, "images_per_sec": images_per_sec}
    dino = "dinov2" in networks
    row.update(compute_metrics(reference["inception"], fake["inception"],
                               real_dino=reference["dinov2"]["features"] if dino else None,
                               fake_dino=fake["dinov2"]["features"] if dino else None,
                               with_precision_recall=with_precision_recall))
    return row


def markdown_table(rows: list[dict]) -> str:
    """A markdown table: sampler, steps, then each metric present in the rows."""
    columns = [(key, title) for key, title in METRIC_COLUMNS if any(key in row for row in rows)]
    lines = ["| sampler | steps | " + " | ".join(title for _, title in columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        cells = [_format(key, row.get(key)) for key, _ in columns]
        lines.append(f"| {row['scheduler']} | {row['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(key: str, value) -> str:
    if value is None:
        return "-"
    if key.startswith("kid"):
        return f"{value:.5f}"
    return f"{value:.3f}" if key in ("precision", "recall") else f"{value:.2f}"


def write_report(report: dict, json_path: Path) -> Path:
    """Write the JSON report and a markdown table next to it (same name, .md); returns the markdown path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    conditioning, drawn = report.get("conditioning"), ""
    if conditioning:
        classes = [str(c) for c in conditioning["class_names"] or conditioning["class_labels"]]
        listed = ", ".join(classes[:8]) + (f", ... ({len(classes)} labels)" if len(classes) > 8 else "")
        drawn = f"; images drawn for classes {listed} in turn, guidance scale {conditioning['guidance_scale']}"
    md_path.write_text(f"Metrics of `{report['model']}` against {report['reference']['description']} "
                       f"({report['reference']['num_images']} images at {report['reference']['resolution']}px)"
                       f"{drawn}\n\n" + markdown_table(report["results"]))
    return md_path


DATA_SETTINGS = ("dataset_name", "dataset_config_name", "dataset_split", "train_data_dir", "image_column",
                 "cache_dir", "resolution")


def reference_data_config(model: str, flags: dict, sample_size: int):
    """Data settings of the reference set: flags > the pipeline's training_config.yaml > the model's resolution and
    the defaults. References are center crops unless center_crop is False."""
    import yaml

    from ..config.loading import TrainConfig
    from ..pipelines.sampling import TRAINING_CONFIG_NAME

    values = {"resolution": sample_size, "center_crop": True}
    training_yaml = Path(model) / TRAINING_CONFIG_NAME
    if training_yaml.is_file():
        trained = yaml.safe_load(training_yaml.read_text()) or {}
        values.update({k: trained[k] for k in DATA_SETTINGS if trained.get(k) is not None})
    if flags.get("dataset_name") and not flags.get("train_data_dir"):
        values.pop("train_data_dir", None)  # an explicit Hub dataset replaces the folder the model was trained on
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**values)


@dataclass
class EvaluateOptions:
    """Everything `flowers-ddpm evaluate` takes besides the data flags."""

    model: str
    num_images: int = 10000
    scheduler: Optional[str] = "ddim"
    steps: int = 50
    seed: int = 0
    batch_size: int = 64
    compare_schedulers: bool = False
    output: str = "metrics.json"
    inception_weights: Optional[str] = None
    feature_network: Optional[str] = None
    dinov2_model: Optional[str] = None
    reference_cache_dir: Optional[str] = None
    reference_num_images: Optional[int] = None
    precision_recall: bool = True
    class_labels: Optional[list] = None  # indices or names; default for class-conditional models: every class
    guidance_scale: Optional[float] = None


def run_evaluation(options: EvaluateOptions, data_flags: dict) -> Optional[dict]:
    """The `evaluate` command: returns the report on the main process (None elsewhere) after writing it."""
    from accelerate import Accelerator

    from ..errors import UserError
    from .features import build_dinov2_network, build_inception_network
    from ..pipelines.sampling import load_pipeline
    from .reference import load_or_compute_reference

    accelerator = Accelerator()
    least = max(4 if options.precision_recall else 2, accelerator.num_processes)
    if options.num_images < least:
        raise UserError(f"num_images must be >= {least} (4 for precision/recall with k=3, and one per process); "
                        f"got {options.num_images}")
    dtype = torch.float16 if accelerator.device.type == "cuda" else None
    pipe = load_pipeline(options.model, accelerator.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    labels = evaluation_labels(pipe, options.class_labels, options.guidance_scale)
    networks = {"inception": build_inception_network(options.inception_weights, options.feature_network)}
    dino = build_dinov2_network(options.dinov2_model)
    if dino is not None:
        networks["dinov2"] = dino
    networks = {name: network.to(accelerator.device) for name, network in networks.items()}
    cfg = reference_data_config(options.model, data_flags, int(pipe.unet.config.sample_size))
    reference = load_or_compute_reference(accelerator, cfg, networks, options.reference_cache_dir,
                                          options.batch_size, options.reference_num_images)
    runs = SCHEDULER_COMPARISON if options.compare_schedulers else ((options.scheduler, options.steps),)
    rows = []
    for scheduler, steps in runs:
        sampling = SamplingSettings(options.num_images, scheduler, steps, options.seed, options.batch_size,
                                    labels, options.guidance_scale)
        rows.append(evaluate_pipeline(accelerator, pipe, networks, reference, sampling, options.precision_recall))
    if not accelerator.is_main_process:
        return None
    report = {"model": options.model, "seed": options.seed,
              "feature_networks": {name: getattr(n, "name", type(n).__name__) for name, n in networks.items()},
              "reference": {"description": cfg.train_data_dir or f"{cfg.dataset_name} ({cfg.dataset_split})",
                            "resolution": cfg.resolution, "center_crop": cfg.center_crop,
                            "num_images": len(reference["inception"]["features"])},
              "results": rows}
    conditioning = conditioning_record(pipe, labels, options.guidance_scale)
    if conditioning is not None:
        report["conditioning"] = conditioning
    write_report(report, Path(options.output))
    if (Path(options.model) / "model_index.json").is_file():  # a local pipeline: the metrics travel with it
        write_report(report, Path(options.model) / "metrics.json")
    return report
