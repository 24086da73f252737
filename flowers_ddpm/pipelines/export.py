"""Exporting trained UNets (and a noise-aware classifier) as `DiffusionPipeline.from_pretrained`-loadable folders.

An unconditional DDPM-trained UNet becomes a plain diffusers `DDPMPipeline`; a class-conditional, learned-variance
or EDM-trained UNet (DDPMPipeline neither scales the initial noise nor calls `scale_model_input`) a
`GuidedDDPMPipeline` whose source file (pipelines/guided.py) ships inside the folder, so plain diffusers loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from diffusers import DDPMPipeline

from .._util.atomic import atomic_folder
from ..config.samplers import DEFAULT_GUIDANCE_SCALE
from ..models import classifier
from . import guided
from .guided import GuidedDDPMPipeline, is_edm_scheduler
from .sampling import load_classifier, load_pipeline, with_classifier

TRAINING_CONFIG_NAME = "training_config.yaml"


GUIDED_PIPELINE_MODULE = "guided_ddpm_pipeline"  # the file name of guided_pipeline.py inside exported folders


def needs_guided_pipeline(unet, noise_scheduler=None) -> bool:
    """Class-conditional or learned-variance UNets, and UNets sampled by an EDM scheduler, need GuidedDDPMPipeline;
    the rest are plain DDPMPipelines."""
    return (unet.config.num_class_embeds is not None or unet.config.out_channels != unet.config.in_channels
            or (noise_scheduler is not None and is_edm_scheduler(noise_scheduler)))


def build_pipeline(unet, noise_scheduler, class_names: Optional[list] = None, guidance_scale: Optional[float] = None,
                   guidance_interval: Optional[Sequence[float]] = None):
    """A plain diffusers DDPMPipeline for an unconditional DDPM UNet, a GuidedDDPMPipeline otherwise, whose saved
    defaults are, when the UNet is class-conditional, the classifier-free `guidance_scale` (None: the measured best,
    DEFAULT_GUIDANCE_SCALE) and `guidance_interval`, the noise levels lo, hi of that guidance, when given."""
    if guidance_interval is not None and not unet.config.num_class_embeds:
        raise ValueError("guidance_interval needs a class-conditional UNet (classifier-free guidance)")
    if needs_guided_pipeline(unet, noise_scheduler):
        if not unet.config.num_class_embeds:
            guidance = 1.0  # no classifier-free guidance without classes
        else:
            guidance = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        return GuidedDDPMPipeline(unet=unet, scheduler=noise_scheduler, class_names=class_names,
                                  guidance_scale=guidance, guidance_interval=guidance_interval)
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


CLASSIFIER_MODULE = "classifier"  # the file name of classifier.py inside a pipeline folder's classifier/ folder


def _ship_pipeline_code(folder: Path, pipe) -> None:
    """Make a GuidedDDPMPipeline folder loadable by plain diffusers: copy the class's source file into it and name
    it in model_index.json, diffusers' convention for custom pipelines (loaded with trust_remote_code=True). A
    saved classifier ships its source as `classifier/classifier.py`, diffusers' convention for custom components
    (`get_class_obj_and_candidates` loads `<component>/<library>.py` of a ["<library>", "<class>"] entry)."""
    shutil.copyfile(guided.__file__, folder / f"{GUIDED_PIPELINE_MODULE}.py")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [GUIDED_PIPELINE_MODULE, "GuidedDDPMPipeline"]
    if getattr(pipe, "classifier", None) is not None:
        shutil.copyfile(classifier.__file__, folder / "classifier" / f"{CLASSIFIER_MODULE}.py")
        index["classifier"] = [CLASSIFIER_MODULE, type(pipe.classifier).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe, path: str | Path, write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write `pipe` as a `DiffusionPipeline.from_pretrained`-loadable folder (safetensors) atomically at `path`,
    with the code of a GuidedDDPMPipeline and its classifier; `write_extra(folder)` adds more files before the
    folder is moved into place."""
    path = Path(path)
    with atomic_folder(path) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if isinstance(pipe, GuidedDDPMPipeline):
            _ship_pipeline_code(tmp, pipe)
        if write_extra is not None:
            write_extra(tmp)
    return path


def export_pipeline(unet, noise_scheduler, path: str | Path, training_config_yaml: Optional[str] = None,
                    class_names: Optional[list] = None, write_extra: Optional[Callable[[Path], None]] = None,
                    guidance_scale: Optional[float] = None,
                    guidance_interval: Optional[Sequence[float]] = None) -> Path:
    """Export a trained UNet and its noise scheduler as a pipeline folder at `path` (see `save_pipeline`), with
    the guidance scale and interval given as its defaults (see `build_pipeline`)."""
    def extras(folder: Path) -> None:
        if training_config_yaml is not None:
            (folder / TRAINING_CONFIG_NAME).write_text(training_config_yaml)
        if write_extra is not None:
            write_extra(folder)

    return save_pipeline(build_pipeline(unet, noise_scheduler, class_names, guidance_scale, guidance_interval), path,
                         extras)


def attach_classifier(model: str, classifier_dir: str, output: str | Path, classifier_scale: float = 1.0,
                      guidance_scale: Optional[float] = None) -> Path:
    """Write a GuidedDDPMPipeline folder at `output`: the pipeline `model` (conditional or not) with the classifier
    of `classifier_dir` as its saved `classifier` component and the given default guidance scales, loadable with
    only diffusers installed. The source's training config and saved guidance interval are kept."""
    device = torch.device("cpu")
    classifier = load_classifier(classifier_dir, device)
    pipe = with_classifier(load_pipeline(model, device), classifier)
    pipe.register_modules(classifier=classifier)
    if guidance_scale is None:  # keep the model's saved classifier-free guidance (1 for unconditional models)
        guidance_scale = getattr(pipe.config, "guidance_scale", 1.0)
    pipe.register_to_config(classifier_scale=float(classifier_scale), guidance_scale=float(guidance_scale))
    source_config = Path(model) / TRAINING_CONFIG_NAME

    def copy_training_config(folder: Path) -> None:
        if source_config.is_file():
            shutil.copyfile(source_config, folder / TRAINING_CONFIG_NAME)

    return save_pipeline(pipe, output, copy_training_config)
