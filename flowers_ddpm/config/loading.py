"""Typed training configuration: defaults < YAML file < command-line flags, validated once.

Flag names and meanings follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
wherever that script has the flag, so an existing command line keeps working after swapping the program name.
The dataclass below is the single source of truth: the argparse parser and the YAML schema are derived from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import UserError
from .recipes import RECIPES, recipe_settings

FLOWERS_DATASET = "nelorth/oxford-flowers"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb", "none")
SAMPLE_SCHEDULERS = ("ddpm", "ddim", "dpmsolver++")
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"  # attention projections and ResNet convolutions
FINETUNE_LEARNING_RATE = 2e-5  # default LR when fine-tuning all (or --train_only) weights of a pretrained UNet


def _opt(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None, cli: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum, "cli": cli})


@dataclass
class TrainConfig:
    """Every setting of a training run. See the README's configuration reference."""

    # model and noise schedule
    model_preset: str = _opt("ddpm", "UNet preset (see flowers_ddpm.models.unet.PRESETS)")
    unet_config: Optional[dict] = _opt(None, "explicit UNet2DModel kwargs, merged over the preset (YAML only)", cli=False)
    prediction_type: str = _opt("epsilon", "what the UNet predicts", PREDICTION_TYPES)
    ddpm_num_steps: int = _opt(1000, "diffusion steps of the noise schedule", minimum=1)
    ddpm_beta_schedule: str = _opt("linear", "beta schedule", BETA_SCHEDULES)
    # data
    dataset_name: str = _opt(FLOWERS_DATASET, "Hub image dataset to stream (ignored with --train_data_dir)")
    dataset_config_name: Optional[str] = _opt(None, "config name of the Hub dataset")
    dataset_split: str = _opt("all", "split to train on; 'all' chains every split")
    train_data_dir: Optional[str] = _opt(None, "local image folder (sub-folders are classes), streamed through datasets")
    image_column: Optional[str] = _opt(None, "image column; auto-detected when unset")
    cache_dir: Optional[str] = _opt(None, "datasets cache directory")
    resolution: int = _opt(64, "training resolution (square)", minimum=8)
    center_crop: bool = _opt(False, "center-crop after resizing (random crop otherwise)")
    random_flip: bool = _opt(False, "random horizontal flips")
    shuffle_buffer_size: int = _opt(1000, "examples held in the resumable shuffle buffer (1 = stream order)", minimum=1)
    dataloader_num_workers: int = _opt(0, "decode threads per process (0 = decode inline)", minimum=0)
    # optimisation
    train_batch_size: int = _opt(16, "batch size per process", minimum=1)
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", minimum=1)
    max_train_steps: Optional[int] = _opt(None, "optimizer steps to train (default: from --num_epochs)", minimum=1)
    num_epochs: Optional[int] = _opt(None, "epochs, only when the dataset size is known", minimum=1)
    learning_rate: float = _opt(1e-4, "peak learning rate", minimum=0.0)
    lr_scheduler: str = _opt("cosine", "learning-rate schedule", LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(500, "warm-up optimizer steps", minimum=0)
    adam_beta1: float = _opt(0.95, "AdamW beta1", minimum=0.0)
    adam_beta2: float = _opt(0.999, "AdamW beta2", minimum=0.0)
    adam_weight_decay: float = _opt(1e-6, "AdamW weight decay", minimum=0.0)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", minimum=0.0)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)", minimum=0.0)
    mixed_precision: Optional[str] = _opt(None, "mixed precision; unset = accelerate's config", MIXED_PRECISION)
    seed: int = _opt(0, "seed for weights, noise, data order and augmentation")
    # EMA
    use_ema: bool = _opt(True, "keep an exponential moving average of the weights and export it")
    ema_inv_gamma: float = _opt(1.0, "EMA warm-up inverse gamma", minimum=0.0)
    ema_power: float = _opt(0.75, "EMA warm-up power", minimum=0.0)
    ema_max_decay: float = _opt(0.9999, "EMA maximum decay", minimum=0.0)
    # outputs, logging, checkpoints
    output_dir: str = _opt("ddpm-flowers-64", "where checkpoints, logs, samples and the pipeline go")
    logger: str = _opt("tensorboard", "experiment tracker", LOGGERS)
    logging_dir: str = _opt("logs", "tracker directory, relative to --output_dir")
    logging_steps: int = _opt(10, "log loss, lr, EMA decay and images/s every N optimizer steps", minimum=1)
    tracker_project_name: str = _opt("flowers-ddpm", "tracker project name")
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N optimizer steps", minimum=1)
    checkpoints_total_limit: Optional[int] = _opt(None, "keep only the newest N checkpoints", minimum=1)
    resume_from_checkpoint: Optional[str] = _opt(None, "'latest' or a checkpoint directory")
    save_images_steps: int = _opt(1000, "write a sample grid PNG every N optimizer steps", minimum=1)
    save_model_steps: Optional[int] = _opt(None, "also export the pipeline every N optimizer steps", minimum=1)
    eval_batch_size: int = _opt(16, "images in each sample grid", minimum=1)
    ddpm_num_inference_steps: int = _opt(50, "sampler steps for the sample grids", minimum=1)
    sample_scheduler: str = _opt("ddim", "sampler for the sample grids", SAMPLE_SCHEDULERS)
    log_data_order: bool = _opt(False, "write the ids of the examples each process trains on to <output_dir>/data_order/")
    # -- evaluation during training (issue 6)
    eval_steps: Optional[int] = _opt(None, "compute FID/KID (EMA weights) every N optimizer steps and keep "
                                     "<output_dir>/best/ (the pipeline with the best FID)", minimum=1)
    eval_num_images: int = _opt(1000, "images generated for each evaluation (sampler: --sample_scheduler, "
                                "--ddpm_num_inference_steps)", minimum=2)
    inception_weights: Optional[str] = _opt(None, "FID Inception weights file weights-inception-2015-12-05-6726825d.pth "
                                            "(downloaded when unset)")
    eval_feature_network: Optional[str] = _opt(None, "module:function returning a replacement for the Inception "
                                               "network (numbers then do not compare with papers)")
    reference_cache_dir: Optional[str] = _opt(None, "cache of reference features (default ~/.cache/flowers_ddpm/reference)")
    reference_num_images: Optional[int] = _opt(None, "use only the first N real images as reference (default: all)",
                                               minimum=2)
    # -- fault tolerance (issue 3)
    max_consecutive_nonfinite: int = _opt(10, "stop after this many consecutive steps with a non-finite loss or "
                                          "gradient (each such update is skipped)", minimum=1)
    # -- the paper's model: ADM, loss weighting, learned variances, class conditioning and guidance (issue 5)
    dropout: Optional[float] = _opt(None, "UNet dropout; unset = the preset's (adm: 0.1, others: 0)", minimum=0.0)
    snr_gamma: Optional[float] = _opt(None, "Min-SNR-gamma loss weighting (5.0 recommended); unset = plain MSE", minimum=0.0)
    learn_sigma: bool = _opt(False, "learn the variances (6-channel UNet) with the hybrid loss L_simple + vlb_weight * L_vlb")
    vlb_weight: float = _opt(0.001, "weight of L_vlb in the hybrid loss (with --learn_sigma)", minimum=0.0)
    class_conditional: bool = _opt(False, "condition the UNet on the dataset's class labels (sub-folders of a local folder)")
    class_dropout_prob: float = _opt(0.1, "probability of training a label as 'no class' (classifier-free guidance)", minimum=0.0)
    sample_guidance_scale: float = _opt(3.0, "classifier-free guidance scale of the sample grids of class-conditional runs", minimum=0.0)
    # -- fine-tuning and publishing (issue 7)
    init_from: Optional[str] = _opt(None, "pipeline folder, Hub id or bare UNet2DModel folder to fine-tune from")
    lora_rank: Optional[int] = _opt(None, "train LoRA adapters of this rank instead of all weights (needs init_from)",
                                    minimum=1)
    lora_alpha: Optional[float] = _opt(None, "LoRA scale numerator (default: lora_rank, i.e. scale 1)", minimum=0.0)
    lora_target_modules: str = _opt(LORA_TARGETS, "comma-separated UNet module names that get LoRA adapters")
    train_only: Optional[str] = _opt(None, "comma-separated UNet parts to train (e.g. up_blocks,mid_block); "
                                           "the rest is frozen")
    push_to_hub: bool = _opt(False, "push the pipeline (with a model card) to the Hub at the end of training")
    hub_model_id: Optional[str] = _opt(None, "Hub repo id to push to (default: the name of output_dir)")
    hub_private_repo: bool = _opt(False, "create the Hub repo as private")
    # -- speed (issue 4)
    decode_cache: bool = _opt(False, "decode every image once into a uint8 cache at training resolution and train "
                              "from it (only the random crop/flip is done per step)")
    decode_cache_dir: Optional[str] = _opt(None, "where decode caches live (default: ~/.cache/flowers_ddpm/decoded)")
    decode_cache_ram_mb: int = _opt(4096, "load a decode cache up to this size into RAM, else memory-map it", minimum=0)
    channels_last: bool = _opt(True, "feed the UNet channels-last (NHWC) batches")
    allow_tf32: bool = _opt(True, "TF32 matmuls and convolutions on Ampere and newer GPUs")
    compile: bool = _opt(False, "torch.compile the UNet in place (the first steps compile)")
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in the backward pass to save memory")
    # -- noise-aware classifier for classifier guidance: train-classifier (issue 5)
    classifier_eval_images: int = _opt(256, "train-classifier: images on which accuracy is reported per noise level",
                                       minimum=1)
    classifier_eval_split: Optional[str] = _opt(None, "train-classifier: dataset split of the accuracy report "
                                                "(unset = the training split)")
    classifier_eval_timesteps: Optional[str] = _opt(None, "train-classifier: comma-separated noise levels t of the "
                                                    "accuracy report (unset = 0, T/4, T/2, 3T/4, T-1)")
    classifier_eval_steps: Optional[int] = _opt(None, "train-classifier: report accuracy every N optimizer steps "
                                                "(unset = at the end only)", minimum=1)
    # -- recipes (issue 8)
    recipe: Optional[str] = _opt(None, "tuned defaults applied under your YAML and flags (see RECIPES.md)", ("small-data",))
    debug: bool = _opt(False, "show tracebacks for user errors")

    def to_dict(self) -> dict:
        """All settings except secrets (any field named *token*): safe to write to files, logs and cards."""
        return {k: v for k, v in dataclasses.asdict(self).items() if "token" not in k}

    def save_yaml(self, path: str | Path) -> None:
        """Write the effective configuration as YAML."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> type:
    tp = _TYPES[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field; unset flags stay absent so YAML values are not overridden."""
    parser.add_argument("--config", help="YAML file with any of the settings below")
    for name, f in _FIELDS.items():
        if not f.metadata["cli"]:
            continue
        tp = _base_type(name)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if tp is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(f"--{name}", type=str, default=argparse.SUPPRESS, metavar=tp.__name__.upper(), help=help_text)


def _coerce(name: str, value: Any) -> Any:
    tp = _base_type(name)
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("none", "null") and _TYPES[name] != tp:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {tp.__name__}, got {value!r}") from None


def load_yaml(path: str) -> dict:
    """Read a YAML config file into a dict, with a clear error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting: value")
    return data


def build_config(file_values: dict, cli_values: dict) -> TrainConfig:
    """Merge defaults < YAML < CLI, coerce types, and validate."""
    merged: dict[str, Any] = {}
    for source in (file_values, cli_values):
        for key, value in source.items():
            if key not in _FIELDS:
                raise UserError(f"unknown setting {key!r}; see `flowers-ddpm train --help` for the allowed settings")
            merged[key] = _coerce(key, value)
    _recipe_defaults(merged)
    _finetune_defaults(merged)
    cfg = TrainConfig(**merged)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject invalid values with one line naming the setting and what is allowed."""
    for name, f in _FIELDS.items():
        value = getattr(cfg, name)
        choices, minimum = f.metadata["choices"], f.metadata["min"]
        if choices and value is not None and value not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if minimum is not None and value is not None and value < minimum:
            raise UserError(f"{name} must be >= {minimum}; got {value!r}")
    from ..models.unet import PRESETS, downsample_factor  # models imports torch; keep config import light

    if cfg.model_preset not in PRESETS:
        raise UserError(f"model_preset must be one of {', '.join(PRESETS)}; got {cfg.model_preset!r}")
    factor = downsample_factor(cfg.model_preset, cfg.unet_config)
    if cfg.init_from is None and cfg.resolution % factor:
        raise UserError(
            f"resolution must be divisible by {factor} (the {cfg.model_preset} UNet's downsampling factor); got {cfg.resolution}"
        )
    if cfg.max_train_steps is None and cfg.num_epochs is None:
        raise UserError("set max_train_steps (or num_epochs for a dataset of known size)")
    if cfg.train_data_dir is not None and not Path(cfg.train_data_dir).is_dir():
        raise UserError(f"train_data_dir {cfg.train_data_dir} does not exist or is not a directory")
    _validate_evaluation(cfg)
    validate_paper_model(cfg)
    validate_finetune(cfg)
    validate_classifier(cfg)


def classifier_eval_timesteps(cfg: TrainConfig) -> list[int]:
    """The noise levels of train-classifier's accuracy report."""
    steps = cfg.ddpm_num_steps
    if cfg.classifier_eval_timesteps is None:
        return sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    try:
        return [int(t) for t in cfg.classifier_eval_timesteps.split(",")]
    except ValueError:
        raise UserError("classifier_eval_timesteps must be comma-separated integers, e.g. 0,250,500,750,999; got "
                        f"{cfg.classifier_eval_timesteps!r}") from None


def validate_classifier(cfg: TrainConfig) -> None:
    """Checks of the train-classifier settings (issue 5)."""
    levels = classifier_eval_timesteps(cfg)
    if not levels or not all(0 <= t < cfg.ddpm_num_steps for t in levels):
        raise UserError(f"classifier_eval_timesteps must lie in [0, {cfg.ddpm_num_steps - 1}] (ddpm_num_steps - 1); "
                        f"got {cfg.classifier_eval_timesteps!r}")


def _validate_evaluation(cfg: TrainConfig) -> None:
    if cfg.inception_weights is not None and not Path(cfg.inception_weights).is_file():
        raise UserError(f"inception_weights {cfg.inception_weights} does not exist; pass the path of "
                        "weights-inception-2015-12-05-6726825d.pth")
    if cfg.eval_feature_network is not None and ":" not in cfg.eval_feature_network:
        raise UserError(f"eval_feature_network must be module:function; got {cfg.eval_feature_network!r}")


def validate_paper_model(cfg: TrainConfig) -> None:
    """Checks of the issue-5 settings (loss weighting, learned variances, class conditioning)."""
    if cfg.class_dropout_prob > 1:
        raise UserError(f"class_dropout_prob must be between 0 and 1; got {cfg.class_dropout_prob}")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise UserError(f"snr_gamma must be > 0 (or unset); got {cfg.snr_gamma}")
    if cfg.dropout is not None and cfg.dropout >= 1:
        raise UserError(f"dropout must be in [0, 1); got {cfg.dropout}")


def validate_finetune(cfg: TrainConfig) -> None:
    """Checks of the fine-tuning and publishing settings (issue 7)."""
    if cfg.lora_rank is not None and cfg.init_from is None:
        raise UserError("lora_rank needs init_from (LoRA adapts a pretrained UNet)")
    if cfg.lora_rank is not None and cfg.train_only:
        raise UserError("train_only and lora_rank cannot be combined (LoRA already trains only its adapters)")
    if cfg.lora_rank is None and cfg.lora_alpha is not None:
        raise UserError("lora_alpha needs lora_rank")
    if cfg.init_from and cfg.learn_sigma:
        raise UserError("learn_sigma cannot be combined with init_from (the pretrained UNet's output channels are fixed)")


def _recipe_defaults(merged: dict) -> None:
    """Fill the settings the user did not give from the named recipe: defaults < recipe < YAML < flags."""
    if merged.get("recipe") is None:
        return

    if merged["recipe"] not in RECIPES:
        raise UserError(f"recipe must be one of {', '.join(RECIPES)}; got {merged['recipe']!r}")
    model_preset = merged.get("model_preset", _FIELDS["model_preset"].default)
    for key, value in recipe_settings(merged["recipe"], model_preset).items():
        merged.setdefault(key, value)


def _finetune_defaults(merged: dict) -> None:
    """Full fine-tuning of a pretrained UNet defaults to a lower learning rate than training from scratch."""
    if merged.get("init_from") and merged.get("lora_rank") is None and "learning_rate" not in merged:
        merged["learning_rate"] = FINETUNE_LEARNING_RATE


def parse_train_config(args: argparse.Namespace) -> TrainConfig:
    """Build the config from parsed CLI args (which may name a YAML file with --config)."""
    values = vars(args).copy()
    values.pop("command", None)
    values.pop("func", None)
    config_path = values.pop("config", None)
    file_values = load_yaml(config_path) if config_path else {}
    return build_config(file_values, values)
