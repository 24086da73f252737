"""The `evaluate` command: load a pipeline, describe its reference images, evaluate one or several samplers, and
write metrics.json with a markdown table beside it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from accelerate import Accelerator

from .._util import tables
from .._util.hub_ids import shown_name
from ..config.sections import DataSettings
from ..errors import UserError
from ..pipelines.conditioning import interval_label, resolve_conditioning
from ..pipelines.export import TRAINING_CONFIG_NAME
from ..pipelines.sampling import default_sampler, is_edm_config, load_pipeline, make_scheduler
from .evaluate import SamplingSettings, conditioning_record, evaluate_pipeline
from .features import InceptionFeatures, build_dinov2_network, build_inception_network
from .reference import load_or_compute_reference


markdown_table = tables.metrics_table  # the table of metrics.md, also printed by the command
STANDARD_NETWORK = InceptionFeatures.name  # FIDs in other networks' features are not comparable with papers


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
        if conditioning.get("guidance_interval"):
            drawn += f" at noise levels {interval_label(conditioning['guidance_interval'])}"
    network = report["feature_networks"]["inception"]
    features = "" if network == STANDARD_NETWORK else (
        f"\n\nFID, KID, IS and precision/recall in features of `{network}` (a custom feature network): not "
        "comparable with papers.")
    md_path.write_text(f"Metrics of `{report['model']}` against {report['reference']['description']} "
                       f"({report['reference']['num_images']} images at {report['reference']['resolution']}px)"
                       f"{drawn}{features}\n\n" + markdown_table(report["results"]))
    return md_path


DATA_SETTINGS = ("dataset_name", "dataset_config_name", "dataset_split", "train_data_dir", "image_column",
                 "cache_dir", "resolution")


def reference_data_config(model: str, flags: dict, sample_size: int) -> DataSettings:
    """Data settings of the reference set: flags > the pipeline's training_config.yaml > the model's resolution and
    the defaults. References are center crops unless center_crop is False."""
    values = {"resolution": sample_size, "center_crop": True}
    training_yaml = Path(model) / TRAINING_CONFIG_NAME
    if training_yaml.is_file():
        trained = yaml.safe_load(training_yaml.read_text()) or {}
        values.update({k: trained[k] for k in DATA_SETTINGS if trained.get(k) is not None})
    if flags.get("dataset_name") and not flags.get("train_data_dir"):
        values.pop("train_data_dir", None)  # an explicit Hub dataset replaces the folder the model was trained on
    values.update({k: v for k, v in flags.items() if v is not None})
    return DataSettings(**values)


def reference_record(data: DataSettings, num_images: int) -> dict:
    """What metrics.json says about the reference images, without local paths."""
    if data.train_data_dir:
        description, dataset = f"local folder {shown_name(data.train_data_dir)}", None
    else:
        description, dataset = f"{data.dataset_name} ({data.dataset_split})", data.dataset_name
    return {"description": description, "dataset_name": dataset, "split": data.dataset_split,
            "resolution": data.resolution, "center_crop": data.center_crop, "num_images": num_images}


@dataclass
class EvaluateOptions:
    """Everything `flowers-ddpm evaluate` takes besides the data flags."""

    model: str
    num_images: int = 10000
    scheduler: Optional[str] = None  # None: pipelines.sampling.default_sampler, by the pipeline's family
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
    guidance_interval: Optional[list] = None  # [lo, hi] noise levels of classifier-free guidance; None: the saved one


def feature_networks(options: EvaluateOptions) -> dict:
    """The Inception (or replacement) and DINOv2 networks; when some cannot be loaded (offline without the
    download, not installed), one error names every one of them."""
    builders = {"inception": lambda: build_inception_network(options.inception_weights, options.feature_network),
                "dinov2": lambda: build_dinov2_network(options.dinov2_model)}
    networks, problems = {}, []
    for name, build in builders.items():
        try:
            networks[name] = build()
        except UserError as e:
            problems.append(str(e))
    if len(problems) > 1:
        raise UserError(f"evaluate needs {len(problems)} things it cannot load: "
                        + " ".join(f"({i}) {problem}" for i, problem in enumerate(problems, 1)))
    if problems:
        raise UserError(problems[0])
    return {name: network for name, network in networks.items() if network is not None}


def run_evaluation(options: EvaluateOptions, data_flags: dict, write_output: bool = True) -> Optional[dict]:
    """The `evaluate` command: returns the report on the main process (None elsewhere) after writing it to
    options.output (unless not `write_output`) and, for a local pipeline, into the pipeline's folder."""
    accelerator = Accelerator()
    least = max(4 if options.precision_recall else 2, accelerator.num_processes)
    if options.num_images < least:
        raise UserError(f"num_images must be >= {least} (4 for precision/recall with k=3, and one per process); "
                        f"got {options.num_images}")
    # the networks first: every download they miss is named before anything else is loaded
    networks = {name: network.to(accelerator.device) for name, network in feature_networks(options).items()}
    dtype = torch.float16 if accelerator.device.type == "cuda" else None
    pipe = load_pipeline(options.model, accelerator.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    # class-conditional: the requested classes, else every class in turn
    labels = resolve_conditioning(pipe, options.class_labels, options.guidance_scale, every_class=True,
                                  guidance_interval=options.guidance_interval)
    config = pipe.scheduler.config
    if options.compare_schedulers:
        runs = EDM_SCHEDULER_COMPARISON if is_edm_config(config) else SCHEDULER_COMPARISON
    else:
        runs = ((options.scheduler or default_sampler(config), options.steps),)
    for name, _ in runs:  # a sampler of the other family is refused before the reference is computed
        make_scheduler(name, config)
    data = reference_data_config(options.model, data_flags, int(pipe.unet.config.sample_size))
    reference = load_or_compute_reference(accelerator, data, networks, options.reference_cache_dir,
                                          options.batch_size, options.reference_num_images)
    rows = []
    for scheduler, steps in runs:
        sampling = SamplingSettings(options.num_images, scheduler, steps, options.seed, options.batch_size,
                                    labels, options.guidance_scale, options.guidance_interval)
        rows.append(evaluate_pipeline(accelerator, pipe, networks, reference, sampling, options.precision_recall))
    if not accelerator.is_main_process:
        return None
    # published with the model (push uploads metrics.json and .md): local paths appear as their last component
    report = {"model": shown_name(options.model), "seed": options.seed,
              "feature_networks": {name: getattr(n, "name", type(n).__name__) for name, n in networks.items()},
              "reference": reference_record(data, len(reference["inception"]["features"])),
              "results": rows}
    conditioning = conditioning_record(pipe, labels, options.guidance_scale, options.guidance_interval)
    if conditioning is not None:
        report["conditioning"] = conditioning
    if write_output:
        write_report(report, Path(options.output))
    if (Path(options.model) / "model_index.json").is_file():  # a local pipeline: the metrics travel with it
        write_report(report, Path(options.model) / "metrics.json")
    return report


def rank_models(options: EvaluateOptions, models: list[str], data_flags: dict) -> Optional[dict]:
    """`evaluate --model A B ...`: each pipeline on the same sampler, seeds and reference settings, ranked by FID
    (e.g. the EMA lengths `ema-reconstruct` wrote). Each local pipeline gets its own metrics.json; options.output
    gets the comparison ({"ranking": [...], "best": ..., "reports": [...]}) and a markdown table next to it.
    Returns the comparison on the main process (None elsewhere)."""
    if options.compare_schedulers:
        raise UserError("--compare_schedulers takes one --model; give several models without it to rank them")
    if len(set(models)) < len(models):
        raise UserError("a --model is given twice")
    missing = [m for m in models if Path(m).exists() and not (Path(m) / "model_index.json").is_file()]
    if missing:  # before the first evaluation, not after it
        raise UserError(f"{missing[0]} is not a pipeline folder (no model_index.json)")
    reports = [run_evaluation(dataclasses.replace(options, model=model), data_flags, write_output=False)
               for model in models]
    if reports[0] is None:  # not the main process
        return None
    order = sorted(range(len(models)), key=lambda i: reports[i]["results"][0]["fid"])
    ranking = [{"model": models[i], **reports[i]["results"][0]} for i in order]
    comparison = {"best": ranking[0]["model"], "ranking": ranking, "reports": reports}
    write_ranking(comparison, Path(options.output))
    return comparison


def write_ranking(comparison: dict, json_path: Path) -> Path:
    """The comparison of several models as JSON, and a markdown table (best FID first) next to it."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(comparison, indent=2) + "\n")
    references = {json.dumps(r["reference"], sort_keys=True) for r in comparison["reports"]}
    note = "" if len(references) == 1 else (
        "\n\nThe models were measured against different reference images (their training data differ): their "
        "FIDs do not compare.")
    first = comparison["reports"][0]
    md_path = json_path.with_suffix(".md")
    md_path.write_text(f"{len(comparison['ranking'])} models ranked by FID against "
                       f"{first['reference']['description']}; best: `{comparison['best']}`{note}\n\n"
                       + tables.ranking_table(comparison["ranking"]))
    return md_path


# --compare_schedulers: the quality/speed trade-off users ask about, on the same model and seeds
SCHEDULER_COMPARISON = (("ddpm", 1000), ("ddim", 50), ("ddim", 25), ("dpmsolver++", 20), ("dpmsolver++", 10))
# the same for EDM-trained pipelines, which only EDM samplers can sample (Euler: first order, like DDIM)
EDM_SCHEDULER_COMPARISON = (("edm-euler", 50), ("edm-dpmsolver++", 50), ("edm-dpmsolver++", 20),
                            ("edm-dpmsolver++", 10))

