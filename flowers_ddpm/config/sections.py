"""The settings of a training run, in sections by domain: each stage takes only its own section.

One YAML file and flat command-line flags (diffusers' names, e.g. `--resolution`, `--learning_rate`) fill them; a
flag's section is found by its name, so users never write a section. Flag names and meanings follow diffusers'
`examples/unconditional_image_generation/train_unconditional.py` wherever that script has the flag. These
dataclasses are the single source of truth: the argparse parser and the YAML schema are derived from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .recipes import RECIPES
# sampler names and sampling defaults (config/samplers.py, shared with the sampling code), re-exported for users of sections
from .samplers import (  # noqa: F401
    DDPM_SAMPLERS, DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLERS, EDM_SAMPLERS, SAMPLE_SCHEDULERS)

FLOWERS_DATASET = "nelorth/oxford-flowers"
HUB_DATASET_SETTINGS = ("dataset_name", "dataset_config_name")  # not used when train_data_dir is set
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# every schedule of diffusers.DDPMScheduler and every name of diffusers.optimization.get_scheduler (tests check both)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
MIXED_PRECISION = ("auto", "config", "no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb", "none")
OBJECTIVES = ("ddpm", "edm")
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")  # objectives.diffusion.TimestepSampler
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"  # attention projections and ResNet convolutions


def _opt(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None, cli: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum, "cli": cli})


@dataclass
class ModelSettings:
    """The UNet, its noise schedule and what it predicts."""

    model_preset: str = _opt("ddpm", "UNet preset (see flowers_ddpm.models.unet.PRESETS)")
    unet_config: Optional[dict] = _opt(None, "explicit UNet2DModel kwargs, merged over the preset (YAML only)", cli=False)
    model_config_name_or_path: Optional[str] = _opt(None, "UNet2DModel config (a folder with config.json, or a Hub id) "
                                                    "to train instead of the preset, as in diffusers' example")
    prediction_type: str = _opt("epsilon", "what the UNet predicts", PREDICTION_TYPES)
    ddpm_num_steps: int = _opt(1000, "diffusion steps of the noise schedule", minimum=1)
    ddpm_beta_schedule: str = _opt("linear", "beta schedule", BETA_SCHEDULES)
    dropout: Optional[float] = _opt(None, "UNet dropout; unset = the preset's (adm: 0.1, others: 0)", minimum=0.0)
    learn_sigma: bool = _opt(False, "learn the variances (6-channel UNet) with the hybrid loss L_simple + vlb_weight * L_vlb")
    class_conditional: bool = _opt(False, "condition the UNet on the dataset's class labels (sub-folders of a local folder)")


@dataclass
class DataSettings:
    """Where the images come from and how they become training batches."""

    dataset_name: str = _opt(FLOWERS_DATASET, "Hub image dataset to stream (ignored with --train_data_dir)")
    dataset_config_name: Optional[str] = _opt(None, "config name of the Hub dataset")
    dataset_split: str = _opt("all", "split to train on; 'all' chains every split")
    train_data_dir: Optional[str] = _opt(None, "local image folder (sub-folders are classes), streamed through datasets")
    image_column: Optional[str] = _opt(None, "image column; auto-detected when unset")
    cache_dir: Optional[str] = _opt(None, "datasets cache directory")
    resolution: int = _opt(64, "training resolution (square)", minimum=8)
    center_crop: bool = _opt(False, "center-crop after resizing (random crop otherwise)")
    random_flip: bool = _opt(False, "random horizontal flips")
    shuffle_buffer_size: int = _opt(10000, "a dataset of at most this many examples (per process) is shuffled "
                                    "exactly, in a new order each epoch; a longer stream goes through a resumable "
                                    "shuffle buffer of this many raw records, kept in each checkpoint (1 = stream "
                                    "order)", minimum=1)
    dataloader_num_workers: int = _opt(0, "decode threads per process (0 = decode inline)", minimum=0)
    decode_cache: bool = _opt(False, "decode every image once into a uint8 cache at training resolution and train "
                              "from it (only the random crop/flip is done per step)")
    decode_cache_dir: Optional[str] = _opt(None, "where decode caches live (default: ~/.cache/flowers_ddpm/decoded)")
    decode_cache_ram_mb: int = _opt(4096, "load a decode cache up to this size into RAM, else memory-map it", minimum=0)


@dataclass
class ObjectiveSettings:
    """The loss: DDPM or EDM training, weighting, the hybrid VLB term, label dropout for classifier-free guidance,
    non-leaking augmentation of the training batch."""

    objective: str = _opt("ddpm", "ddpm: discrete-time DDPM noising with --prediction_type targets; edm: Karras et "
                          "al. (2022) preconditioning, log-normal noise levels and loss weight (exported with "
                          "diffusers' EDM schedulers; --prediction_type epsilon or v_prediction)", OBJECTIVES)
    sigma_data: float = _opt(0.5, "edm: standard deviation of the data (images in [-1, 1])", minimum=0.0)
    timestep_sampling: str = _opt("uniform", "ddpm: how training timesteps are drawn: uniform (DDPM), or "
                                  "lognormal (EDM's log-normal noise levels, --edm_p_mean/--edm_p_std, mapped to the "
                                  "nearest timestep)", TIMESTEP_SAMPLINGS)
    edm_p_mean: float = _opt(-1.2, "edm, and ddpm with --timestep_sampling lognormal: mean of log(sigma) of the "
                             "training noise levels")
    edm_p_std: float = _opt(1.2, "edm, and ddpm with --timestep_sampling lognormal: standard deviation of "
                            "log(sigma) of the training noise levels", minimum=0.0)
    edm_sigma_min: float = _opt(0.002, "edm: smallest noise level of the exported sampler", minimum=0.0)
    edm_sigma_max: float = _opt(80.0, "edm: largest noise level of the exported sampler", minimum=0.0)
    snr_gamma: Optional[float] = _opt(None, "Min-SNR-gamma loss weighting (5.0 recommended); unset = plain MSE", minimum=0.0)
    learned_loss_weights: bool = _opt(False, "ddpm: weight each noise level's loss by a learned estimate of its mean "
                                      "(EDM2's uncertainty weighting), so every level pulls alike; a training-only "
                                      "network with its own optimizer, kept in checkpoints, not exported")
    vlb_weight: float = _opt(0.001, "weight of L_vlb in the hybrid loss (with --learn_sigma)", minimum=0.0)
    class_dropout_prob: float = _opt(0.1, "probability of training a label as 'no class' (classifier-free guidance)", minimum=0.0)
    augment_p: float = _opt(0.0, "non-leaking augmentation (EDM): probability of each of x-flip, integer translation, "
                            "scaling, rotation, anisotropy, brightness, contrast, saturation per training image; the "
                            "UNet is conditioned on what was done and samples un-augmented images (0 = off)",
                            minimum=0.0)


@dataclass
class OptimSettings:
    """Batch, length, AdamW and the learning-rate schedule."""

    train_batch_size: int = _opt(16, "batch size per process", minimum=1)
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", minimum=1)
    max_train_steps: Optional[int] = _opt(None, "optimizer steps to train (default: from --num_epochs)", minimum=1)
    num_epochs: Optional[int] = _opt(None, "epochs, counted in optimizer steps as diffusers' example counts them; "
                                     "needs a dataset of known size; 100 when max_train_steps is unset too",
                                     minimum=1)
    learning_rate: float = _opt(1e-4, "peak learning rate", minimum=0.0)
    lr_scheduler: str = _opt("cosine", "learning-rate schedule", LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(500, "warm-up optimizer steps", minimum=0)
    lr_step_rules: Optional[str] = _opt(None, "piecewise_constant schedule: 'multiplier:until_step,...,final_multiplier' "
                                        "(e.g. 1:1000,0.1:2000,0.01)")
    adam_beta1: float = _opt(0.95, "AdamW beta1", minimum=0.0)
    adam_beta2: float = _opt(0.999, "AdamW beta2", minimum=0.0)
    adam_weight_decay: float = _opt(1e-6, "AdamW weight decay", minimum=0.0)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", minimum=0.0)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)", minimum=0.0)


@dataclass
class EMASettings:
    """The exponential moving average of the weights."""

    use_ema: bool = _opt(True, "keep an exponential moving average of the weights and export it")
    ema_inv_gamma: float = _opt(1.0, "EMA warm-up inverse gamma", minimum=0.0)
    ema_power: float = _opt(0.75, "EMA warm-up power", minimum=0.0)
    ema_max_decay: float = _opt(0.9999, "EMA maximum decay", minimum=0.0)
    phema_sigma_rel: Optional[str] = _opt(None, "post-hoc EMA (EDM2): comma-separated relative widths of the "
                                          "power-function EMA profiles kept during training, e.g. 0.05,0.1 "
                                          "(unset = off); `flowers-ddpm ema-reconstruct` synthesises others")
    phema_snapshot_steps: int = _opt(500, "post-hoc EMA: write both profiles to <output_dir>/phema/ every N "
                                     "optimizer steps (and at the end)", minimum=1)


@dataclass
class RunSettings:
    """The run's outputs, seed, logging, checkpoints and sample grids."""

    output_dir: str = _opt("ddpm-flowers-64", "where checkpoints, logs, samples and the pipeline go")
    overwrite_output_dir: bool = _opt(False, "allow starting a new run in an output_dir that holds another run's "
                                      "checkpoints (they are replaced)")
    seed: int = _opt(0, "seed for weights, noise, data order and augmentation")
    logger: str = _opt("tensorboard", "experiment tracker", LOGGERS)
    logging_dir: str = _opt("logs", "tracker directory, relative to --output_dir")
    logging_steps: int = _opt(10, "log loss, lr, EMA decay and images/s every N optimizer steps", minimum=1)
    tracker_project_name: str = _opt("flowers-ddpm", "tracker project name")
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N optimizer steps", minimum=1)
    checkpoints_total_limit: Optional[int] = _opt(None, "keep only the newest N checkpoints", minimum=1)
    resume_from_checkpoint: Optional[str] = _opt(None, "'latest' or a checkpoint directory")
    save_images_steps: int = _opt(1000, "write a sample grid PNG every N optimizer steps", minimum=1)
    save_model_steps: Optional[int] = _opt(None, "also export the pipeline every N optimizer steps", minimum=1)
    keep_exports: bool = _opt(False, "keep a copy of every pipeline export as <output_dir>/exports/step-N (pipeline/ "
                              "holds only the latest), e.g. to judge a run's quality over time")
    save_images_epochs: Optional[int] = _opt(None, "write a sample grid every N epochs (replaces save_images_steps; "
                                             "needs a dataset of known size)", minimum=1)
    save_model_epochs: Optional[int] = _opt(None, "export the pipeline every N epochs (replaces save_model_steps; "
                                            "needs a dataset of known size)", minimum=1)
    eval_batch_size: int = _opt(16, "images in each sample grid", minimum=1)
    ddpm_num_inference_steps: int = _opt(50, "sampler steps for the sample grids", minimum=1)
    sample_scheduler: str = _opt(DEFAULT_SAMPLERS["ddpm"], "sampler for the sample grids and in-training "
                                 f"evaluation (with --objective edm: {DEFAULT_SAMPLERS['edm']} unless given)",
                                 SAMPLE_SCHEDULERS)
    sample_guidance_scale: float = _opt(DEFAULT_GUIDANCE_SCALE, "classifier-free guidance scale of the sample grids and in-training "
                                        "evaluation of class-conditional runs, saved as the exported pipeline's "
                                        "default (1.5: the best measured, docs/sampling.md)", minimum=0.0)
    sample_guidance_interval: Optional[list[float]] = _opt(None, "two noise levels LO HI: classifier-free guidance "
                                                           "of the sample grids and in-training evaluation only at "
                                                           "LO <= sigma <= HI, saved as the exported pipeline's "
                                                           "default (class-conditional runs; unset = every step; "
                                                           "docs/sampling.md)")
    log_data_order: bool = _opt(False, "write the ids of the examples each process trains on to <output_dir>/data_order/")
    max_consecutive_nonfinite: int = _opt(10, "stop after this many consecutive steps with a non-finite loss or "
                                          "gradient (each such update is skipped)", minimum=1)
    recipe: Optional[str] = _opt(None, "tuned defaults applied under your YAML and flags (see docs/recipes.md)",
                                  RECIPES)
    debug: bool = _opt(False, "show tracebacks for user errors")
    local_rank: int = _opt(-1, "accepted for diffusers compatibility; the launcher (accelerate) sets each process's "
                           "rank")


@dataclass
class EvalSettings:
    """FID/KID during training and the reference images."""

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


@dataclass
class FinetuneSettings:
    """Starting from a pretrained UNet: what to load and what to train."""

    init_from: Optional[str] = _opt(None, "pipeline folder, Hub id or bare UNet2DModel folder to fine-tune from")
    lora_rank: Optional[int] = _opt(None, "train LoRA adapters of this rank instead of all weights (needs init_from)",
                                    minimum=1)
    lora_alpha: Optional[float] = _opt(None, "LoRA scale numerator (default: lora_rank, i.e. scale 1)", minimum=0.0)
    lora_target_modules: str = _opt(LORA_TARGETS, "comma-separated UNet module names that get LoRA adapters")
    train_only: Optional[str] = _opt(None, "comma-separated UNet parts to train (e.g. up_blocks,mid_block); "
                                           "the rest is frozen")


@dataclass
class HubSettings:
    """Pushing the result to the Hugging Face Hub."""

    push_to_hub: bool = _opt(False, "push the pipeline (with a model card) to the Hub at the end of training")
    hub_model_id: Optional[str] = _opt(None, "Hub repo id to push to (default: the name of output_dir)")
    hub_private_repo: bool = _opt(False, "create the Hub repo as private")
    hub_token: Optional[str] = _opt(None, "Hub token for --push_to_hub (never written to any file; `hf auth login` "
                                    "is safer)")


@dataclass
class SpeedSettings:
    """How fast the training step runs (numerics stay the same unless said)."""

    mixed_precision: Optional[str] = _opt("auto", "mixed precision; auto = the fastest of fp32, bf16 (where the "
                                          "device has it) and fp16 (CUDA) by a timed start-up probe, fp32 unless one is "
                                          ">= 10% faster (under accelerate launch: the launcher's); config (or unset) "
                                          "= accelerate's config", MIXED_PRECISION)
    channels_last: Optional[bool] = _opt(None, "feed the UNet channels-last (NHWC) batches; unset (auto) = timed at "
                                         "start against NCHW in the run's precision, NCHW only if >= 5% faster "
                                         "(channels-last when accelerate's config sets the precision)")
    allow_tf32: bool = _opt(True, "TF32 matmuls and convolutions on Ampere and newer GPUs")
    cpu_threads: Optional[int] = _opt(None, "PyTorch threads per process on a CPU; unset (auto) = PyTorch's default "
                                      "lowered to the cores other processes leave idle (1-minute load average, at "
                                      "least 1): threads that share cores with busy processes spin, 4-20x slower "
                                      "(docs/speed.md)", minimum=1)
    compile: Optional[bool] = _opt(None, "torch.compile the UNet in place (the first steps compile); unset (auto) = "
                                   "eager unless the run is projected to take >= 30 min eager and the timed compile "
                                   "time is paid back twice by the timed faster steps")
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in the backward pass to save memory")
    enable_xformers_memory_efficient_attention: bool = _opt(False, "xformers attention when installed (else PyTorch's "
                                                            "SDPA, which is memory-efficient too)")


@dataclass
class ClassifierSettings:
    """Train-classifier's accuracy report."""

    classifier_eval_images: int = _opt(256, "train-classifier: images on which accuracy is reported per noise level "
                                            "(as many of each class as the data allow)", minimum=1)
    classifier_eval_split: Optional[str] = _opt(None, "train-classifier: dataset split of the accuracy report "
                                                "(unset = a seeded sample of each class of the training split, "
                                                "held out from training)")
    classifier_eval_timesteps: Optional[str] = _opt(None, "train-classifier: comma-separated noise levels t of the "
                                                    "accuracy report (unset = 0, T/4, T/2, 3T/4, T-1)")
    classifier_eval_steps: Optional[int] = _opt(None, "train-classifier: report accuracy every N optimizer steps "
                                                "(unset = at the end only)", minimum=1)


SECTIONS: dict[str, type] = {"model": ModelSettings, "data": DataSettings, "objective": ObjectiveSettings, "optim": OptimSettings, "ema": EMASettings, "run": RunSettings, "eval": EvalSettings, "finetune": FinetuneSettings, "hub": HubSettings, "speed": SpeedSettings, "classifier": ClassifierSettings}


@dataclass
class TrainConfig:
    """Every setting of a training run, one section per domain. See docs/configuration.md."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    ema: EMASettings = field(default_factory=EMASettings)
    run: RunSettings = field(default_factory=RunSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)

    # the settings the user gave (YAML file or flags), as opposed to defaults and recipes; not part of the settings
    explicit: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from flat setting names (as in YAML files and flags); unknown names raise KeyError."""
        grouped: dict[str, dict] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            grouped[SECTION_OF[key]][key] = value
        return cls(**{name: SECTIONS[name](**kwargs) for name, kwargs in grouped.items()})

    def to_dict(self, secrets: bool = False, as_used: bool = True) -> dict:
        """All settings, flat; without secrets (any field named *token*) unless asked: safe to write to files, logs
        and cards. `as_used`: the Hub dataset's settings are None when a local folder (train_data_dir) is the
        data, so a written config names the source that was used."""
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        if as_used and flat["train_data_dir"]:
            flat.update({key: None for key in HUB_DATASET_SETTINGS})
        return {k: v for k, v in flat.items() if secrets or "token" not in k}

    def get(self, key: str) -> Any:
        """One setting by its flat name."""
        return getattr(getattr(self, SECTION_OF[key]), key)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings (flat names) changed."""
        return TrainConfig.from_flat({**self.to_dict(secrets=True, as_used=False), **changes})

    def save_yaml(self, path: str | Path) -> None:
        """Write the effective configuration as YAML (flat, as the user writes it)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS: dict[str, dataclasses.Field] = {f.name: f for section in SECTIONS.values() for f in dataclasses.fields(section)}
SECTION_OF: dict[str, str] = {f.name: name for name, section in SECTIONS.items() for f in dataclasses.fields(section)}
