"""Class labels, guidance scales and the guidance interval: the one place that resolves and checks them, for
`sample`, `evaluate`, `sweep` (before its trials train) and training (`sample_guidance_interval`).

Labels are class indices, digit strings or class names (case-insensitive); a class-conditional pipeline names its
own classes, an unconditional one guided by a noise-aware classifier takes the classifier's. GuidedDDPMPipeline
(pipelines/guided.py) keeps a minimal check of its own arguments: it ships inside exported folders and may import
only torch and diffusers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from ..errors import UserError
from .guided import check_interval


def class_ids(class_labels: Sequence, class_names: Optional[Sequence[str]], num_classes: Optional[int]) -> list[int]:
    """Class indices for labels given as indices, digit strings or names of `class_names`; a one-sentence error for
    an unknown name or an index out of range."""
    names = [str(name).lower() for name in class_names or []]
    ids = []
    for label in class_labels:
        text = label.strip() if isinstance(label, str) else None
        if text is not None and text.lower() in names:
            ids.append(names.index(text.lower()))
        elif isinstance(label, int) or (text is not None and text.isdigit()):
            ids.append(int(label))
        else:
            raise UserError(f"unknown class {label!r}; classes are {', '.join(names) or 'indices'}")
        if not 0 <= ids[-1] < (num_classes or 0):
            raise UserError(f"class index {ids[-1]} is out of range for {num_classes} classes")
    return ids


def guides_every_step(interval: Optional[Sequence[float]]) -> bool:
    """Whether classifier-free guidance under `interval` runs at every noise level: None, or [0, inf] (how `sample`
    and the demo override a pipeline's saved interval)."""
    return interval is None or (interval[0] == 0 and math.isinf(interval[1]))


def guidance_in_effect(pipe, guidance_scale: Optional[float] = None,
                       guidance_interval: Optional[Sequence[float]] = None) -> tuple[float, Optional[Sequence[float]]]:
    """The classifier-free guidance scale and interval a pipeline call draws with: the given ones, else the
    pipeline's saved defaults (GuidedDDPMPipeline.__call__'s rule)."""
    scale = guidance_scale if guidance_scale is not None else pipe.config.get("guidance_scale", 1.0)
    interval = guidance_interval if guidance_interval is not None else pipe.config.get("guidance_interval")
    return scale, interval


def interval_label(interval: Optional[Sequence[float]]) -> str:
    """Where guidance runs, for tables and summaries: "every step", "sigma <= HI", "sigma >= LO" or
    "LO <= sigma <= HI"."""
    if guides_every_step(interval):
        return "every step"
    lo, hi = interval
    return f"sigma <= {hi:g}" if lo == 0 else f"sigma >= {lo:g}" if math.isinf(hi) else f"{lo:g} <= sigma <= {hi:g}"


def check_guidance_interval(interval: Optional[Sequence[float]], name: str = "--guidance_interval"
                            ) -> Optional[list[float]]:
    """`interval` (numbers, or their text as typed into the demo's field) as [lo, hi] noise levels by
    GuidedDDPMPipeline's rule (`check_interval`: 0 <= lo < hi), None for guidance at every step; a one-sentence
    error naming the flag or setting `name` otherwise."""
    try:
        return check_interval(interval)
    except ValueError:
        got = " ".join(value if isinstance(value, str) else f"{value:g}" for value in interval)
        raise UserError(f"{name} takes two noise levels 0 <= LO < HI; got {got}") from None


def resolve_conditioning(pipe, class_labels: Optional[Sequence], guidance_scale: Optional[float] = None,
                         classifier=None, classifier_scale: Optional[float] = None,
                         every_class: bool = False, guidance_interval: Optional[Sequence[float]] = None
                         ) -> Optional[list[int]]:
    """The class indices to draw images of (None: unconditional), after checking that the labels, the
    classifier-free `guidance_scale` and `guidance_interval`, the guiding `classifier` (one passed in; else the
    pipeline's saved one) and its `classifier_scale` fit the pipeline; one-sentence errors otherwise. Without
    labels a class-conditional pipeline draws every class in turn when `every_class` (evaluation), else unlabelled
    images through its "no class" token (sampling)."""
    num_classes = getattr(pipe, "num_classes", None)
    if guidance_interval is not None and num_classes is None:
        raise UserError("--guidance_interval needs a class-conditional pipeline; this model is unconditional")
    guide = classifier if classifier is not None else getattr(pipe, "classifier", None)
    if classifier_scale is not None and guide is None:
        raise UserError("--classifier_scale needs --classifier (the folder written by train-classifier) or a "
                        "pipeline that carries one (attach-classifier)")
    if every_class and guidance_scale is not None and num_classes is None:
        raise UserError("--guidance_scale needs a class-conditional pipeline; this model is unconditional")
    labels = None
    if class_labels:
        if num_classes is None and guide is None:
            raise UserError("--class_labels needs a class-conditional pipeline or --classifier; this model is "
                            "unconditional")
        guide_config = getattr(guide, "config", None)
        names = pipe.config.get("class_names") or getattr(guide_config, "class_names", None)
        labels = class_ids(class_labels, names, num_classes if num_classes is not None else
                           getattr(guide_config, "num_classes", 0))
    elif every_class and num_classes is not None:
        labels = list(range(num_classes))
    if classifier is not None and labels is None:
        raise UserError("--classifier needs --class_labels (the classes to guide the samples towards)")
    if guidance_scale is not None and (labels is None or num_classes is None):
        raise UserError("--guidance_scale needs --class_labels and a class-conditional model (classifier-free "
                        "guidance); use --classifier_scale to guide an unconditional model")
    return labels
