"""Publishing an exported pipeline folder to the Hugging Face Hub with a model card.

What is uploaded is a staged copy of the pipeline folder plus README.md (the card) and images/: never checkpoints,
optimizer state, logs or caches. The token comes from HF_TOKEN or the user's `hf auth login`; we never write it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import yaml
from PIL import Image
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError

from .._util.hub_ids import is_hub_id
from .._util.tables import markdown_table, metrics_table
from ..config.sections import FLOWERS_DATASET
from ..errors import UserError
from ..pipelines.sampling import generate, image_grid, load_pipeline
from .report import enlarge, image_size

logger = logging.getLogger(__name__)

# what each of diffusers' prediction types means, for the card's readers
PREDICTS = {"epsilon": "the noise (epsilon)", "v_prediction": "v = alpha * noise - sigma * image (v_prediction)",
            "sample": "the clean image (sample)"}


def require_token(token: Optional[str] = None) -> None:
    """Fail early, with one sentence, when no Hub token is available (`token`: one given explicitly)."""
    if not (token or get_token()):
        raise UserError("pushing to the Hub needs a token: set HF_TOKEN or run `hf auth login`")


def resolve_pipeline_dir(model: str | Path) -> Path:
    """The pipeline folder given directly or as a run's output_dir (which holds pipeline/)."""
    path = Path(model)
    if (path / "model_index.json").is_file():
        return path
    if (path / "pipeline" / "model_index.json").is_file():
        return path / "pipeline"
    raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json) nor a run folder with pipeline/")


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_run(pipeline_dir: Path) -> dict:
    """What the card reports, from files in and next to the pipeline folder (each may be missing)."""
    config_file = pipeline_dir / "training_config.yaml"
    return {
        "config": yaml.safe_load(config_file.read_text()) if config_file.is_file() else {},
        "info": _read_json(pipeline_dir / "training_info.json") or {},
        "metrics": _read_json(pipeline_dir / "metrics.json") or _read_json(pipeline_dir.parent / "metrics.json"),
        "unet": _read_json(pipeline_dir / "unet" / "config.json") or {},
        "scheduler": _read_json(pipeline_dir / "scheduler" / "scheduler_config.json") or {},
    }


def _card_images(pipeline_dir: Path) -> dict[str, Path]:
    """Card images of the run's report (name in the repo -> file), when it is there."""
    report = pipeline_dir.parent / "report"
    images = {}
    for name, file in (("samples.png", "final_samples.png"), ("loss_curve.png", "loss_curve.png"),
                       ("denoising.png", "denoising.png"), ("samples_over_training.png", "samples_over_training.png")):
        if (report / file).is_file():
            images[name] = report / file
    return images


def _hero_image(pipeline_dir: Path, out: Path) -> Path:
    """Without a report: the run's last sample grid, else (a pipeline made elsewhere) 4 images sampled now with 25
    DDIM steps; small images enlarged, as in the report."""
    samples = pipeline_dir.parent / "samples"
    grids = sorted(samples.glob("step-*.png")) if samples.is_dir() else []
    if grids:
        grid = Image.open(grids[-1]).convert("RGB")
    else:
        pipe = load_pipeline(str(pipeline_dir), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        grid = image_grid(generate(pipe, 4, 25, seed=0, scheduler="ddim", batch_size=4, progress=True))
    size = image_size(pipeline_dir)
    enlarge(grid, size or grid.width).save(out)
    return out


def _dataset(config: dict) -> tuple[str, list[str], list[str]]:
    """(description, Hub dataset ids, tags) of the training data."""
    if config.get("train_data_dir"):
        return "a local image folder", [], ["custom-images"]
    name = config.get("dataset_name")
    if not name:
        return "unknown data", [], []
    if name == FLOWERS_DATASET:
        return f"Oxford Flowers102 ([{name}](https://huggingface.co/datasets/{name}))", [name], ["flowers102"]
    return f"[{name}](https://huggingface.co/datasets/{name})", [name], [name.split("/")[-1].lower()]


# Settings that hold local file-system paths: the card shows only their last component, so a published card does
# not reveal the trainer's directory layout (user names, mount points).
LOCAL_PATH_SETTINGS = ("train_data_dir", "cache_dir", "output_dir", "resume_from_checkpoint", "inception_weights",
                       "reference_cache_dir", "init_from", "decode_cache_dir")


def public_config_yaml(config: dict) -> str:
    """The training configuration as published (card and uploaded training_config.yaml): local paths cut to their
    last component; Hub ids and 'latest' are kept."""
    shown = dict(config)
    for key in LOCAL_PATH_SETTINGS:
        value = shown.get(key)
        if isinstance(value, str) and value != "latest" and not is_hub_id(value, namespaced=True):
            shown[key] = Path(value).name or value
    return yaml.safe_dump(shown, sort_keys=False)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


# The feature network of the standard FID (evaluation/features.py InceptionFeatures.name): FIDs measured in any
# other network's features are labelled as not comparable with papers.
STANDARD_FID_NETWORK = "inception-v3-compat"
# metrics of a result row -> (model-index type, title)
CARD_METRICS = {"fid": ("fid", "FID"), "kid_mean": ("kid", "KID"), "is_mean": ("inception_score", "IS"),
                "precision": ("precision", "precision"), "recall": ("recall", "recall"),
                "fd_dinov2": ("fd_dinov2", "FD-DINOv2")}


def _evaluation(metrics: dict, config: dict) -> dict:
    """metrics.json as one shape, whether `flowers-ddpm evaluate` wrote it (results per sampler, the reference)
    or the evaluation during training (best/metrics.json: one flat row): rows, feature network, reference."""
    if "results" in metrics:
        reference = metrics.get("reference") or {}
        return {"rows": metrics["results"], "network": (metrics.get("feature_networks") or {}).get("inception"),
                "dataset": reference.get("dataset_name"), "split": reference.get("split"),
                "about": (f"against {reference.get('description', 'reference images')} "
                          f"({reference.get('num_images', '?')} images at {reference.get('resolution', '?')} px)")}
    network = metrics.get("feature_network") or config.get("eval_feature_network") or STANDARD_FID_NETWORK
    dataset = None if config.get("train_data_dir") else config.get("dataset_name")
    step = f" at step {metrics['step']}" if "step" in metrics else ""
    return {"rows": [metrics], "network": network, "dataset": dataset, "split": config.get("dataset_split"),
            "about": f"measured during training{step} against the training data"}


def _eval_results(evaluation: dict, data_text: str) -> list[EvalResult]:
    """The metrics as Hub `model-index` entries, one per metric and sampler."""
    results = []
    custom = evaluation["network"] != STANDARD_FID_NETWORK
    for row in evaluation["rows"]:
        sampler = f"{row.get('scheduler', 'sampler')}, {row.get('steps', '?')} steps"
        for key, (metric_type, title) in CARD_METRICS.items():
            if not isinstance(row.get(key), (int, float)):
                continue
            in_features = custom and key != "fd_dinov2"
            name = (f"{title} in features of {evaluation['network']}, not comparable with papers" if in_features
                    else title) + f" ({sampler})"
            results.append(EvalResult(
                task_type="unconditional-image-generation", dataset_type=evaluation["dataset"] or "imagefolder",
                dataset_name=data_text if evaluation["dataset"] else "a local image folder", metric_type=metric_type,
                metric_value=round(float(row[key]), 5), metric_name=name, dataset_split=evaluation["split"],
                metric_config=evaluation["network"] if key != "fd_dinov2" else None))
    return results


def _metrics_section(evaluation: Optional[dict]) -> str:
    if not evaluation:
        return ""
    generated = evaluation["rows"][0].get("num_images")
    lines = ["## Metrics", "", (f"{generated} generated images per sampler, measured " if generated else "Measured ")
             + f"{evaluation['about']}."]
    if evaluation["network"] != STANDARD_FID_NETWORK:
        lines += ["", f"**FID in features of {evaluation['network']}: not comparable with papers** (a custom "
                      "feature network replaced the standard Inception; KID, IS and precision/recall too)."]
    lines += ["", metrics_table(evaluation["rows"]).rstrip("\n")]
    return "\n".join(lines) + "\n\n"


def _usage(pipeline_dir: Path, repo_id: str, unet: dict) -> list[str]:
    """The card's code lines: a GuidedDDPMPipeline runs the code shipped in the repo (trust_remote_code) and, with
    classes (its own or its classifier's), draws the class given."""
    index = _read_json(pipeline_dir / "model_index.json") or {}
    batch = "images = pipe(batch_size=4, num_inference_steps=50).images"
    if not isinstance(index.get("_class_name"), list):
        return [f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")', batch]
    load = f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)'
    classifier = _read_json(pipeline_dir / "classifier" / "config.json")
    if not unet.get("num_class_embeds") and classifier is None:  # learned variances only: no classes
        return [load, batch]
    names = index.get("class_names") or (classifier or {}).get("class_names")
    label = repr(names[0]) if names else "0"
    return [load, f"images = pipe(class_labels=[{label}] * 4, num_inference_steps=50).images"]


def build_model_card(pipeline_dir: Path, repo_id: str, image_names: list[str], license: str = "apache-2.0",
                     space_id: Optional[str] = None):
    """A `huggingface_hub.ModelCard` with Hub metadata, the sample grid, a usage snippet and the training facts;
    with `space_id`, a link to the demo Space."""
    run = _read_run(pipeline_dir)
    config, info, unet = run["config"], run["info"], run["unet"]
    data_text, datasets, data_tags = _dataset(config)
    init_from = config.get("init_from")
    from_hub = is_hub_id(init_from, namespaced=True)
    evaluation = _evaluation(run["metrics"], config) if run["metrics"] else None
    eval_results = _eval_results(evaluation, data_text) if evaluation else None
    metadata = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
        tags=["diffusers", "ddpm", "unconditional-image-generation", "pytorch", *data_tags],
        datasets=datasets or None, base_model=init_from if from_hub else None,
        model_name=repo_id.split("/")[-1] if eval_results else None, eval_results=eval_results or None,
    )
    size = unet.get("sample_size", "?")
    origin = ""
    if init_from:  # local paths stay out of the card
        origin = (f"fine-tuned from [{init_from}](https://huggingface.co/{init_from}) " if from_hub
                  else "fine-tuned from a local pretrained model ")
    lora = ""
    if config.get("lora_rank"):
        lora = (f" Trained as a rank-{config['lora_rank']} LoRA; the weights here have the adapter merged in, and the "
                "adapter alone is in `lora_adapter/` (peft format).")
    sched = run["scheduler"]
    rows = [
        ("dataset", data_text),
        ("resolution", f"{size} x {size}"),
        ("optimizer steps", info.get("global_step", config.get("max_train_steps", "unknown"))),
        ("batch size per process x accumulation",
         f"{config.get('train_batch_size', '?')} x {config.get('gradient_accumulation_steps', '?')}"),
        ("learning rate", config.get("learning_rate", "unknown")),
        ("EMA", "yes" if config.get("use_ema") else "no"),
        ("noise schedule", f"{sched.get('num_train_timesteps', '?')} steps, {sched.get('beta_schedule', '?')} betas"),
        ("the UNet predicts", PREDICTS.get(sched.get("prediction_type"), sched.get("prediction_type", "unknown"))),
        ("UNet", f"blocks {unet.get('block_out_channels', '?')}"),
        ("hardware", info.get("hardware", "unknown")),
        ("training time", _duration(info.get("training_seconds"))),
    ]
    body = [f"# {repo_id.split('/')[-1]}", ""]
    if "samples.png" in image_names:
        body += ["![Samples](images/samples.png)", ""]
    if space_id:
        body += [f"Try it in your browser: [{space_id}](https://huggingface.co/spaces/{space_id}) (a Gradio demo "
                 "page).", ""]
    body += [
        f"A denoising diffusion probabilistic model (DDPM) {origin}on {data_text}, generating {size}x{size} RGB "
        f"images, trained with flowers_ddpm (diffusers + accelerate).{lora}", "",
        "## Usage", "", "```python", "from diffusers import DiffusionPipeline", "",
        *_usage(pipeline_dir, repo_id, unet),
        'images[0].save("sample.png")', "```", "",
        "## Training", "",
        markdown_table([{"setting": k, "value": v} for k, v in rows], [("setting", "setting"), ("value", "value")]),
    ]
    for name, title in (("loss_curve.png", "Loss"), ("samples_over_training.png", "Samples during training"),
                        ("denoising.png", "Denoising progression")):
        if name in image_names:
            body += [f"![{title}](images/{name})", ""]
    text = "\n".join(body) + "\n" + _metrics_section(evaluation)
    if config:
        text += ("<details><summary>Training configuration</summary>\n\n```yaml\n"
                 f"{public_config_yaml(config).strip()}\n```\n\n</details>\n")
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{text}")


def stage_upload(model: str | Path, staging_dir: str | Path, repo_id: str, license: str = "apache-2.0",
                 space_id: Optional[str] = None) -> list[str]:
    """Write exactly what would be uploaded into `staging_dir` (which must be empty): the pipeline folder, README.md
    (linking the demo Space `space_id`, if any) and images/. Returns the staged files, relative and sorted."""
    pipeline_dir = resolve_pipeline_dir(model)
    staging = Path(staging_dir)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise UserError(f"staging_dir {staging} must be an empty or new folder")
    shutil.copytree(pipeline_dir, staging, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".cache", "__pycache__", ".git", "*.tmp", "*.old"))
    staged_config = staging / "training_config.yaml"
    if staged_config.is_file():  # the local copy keeps full paths (resume needs them); the Hub copy does not
        staged_config.write_text(public_config_yaml(yaml.safe_load(staged_config.read_text())))
    (staging / "images").mkdir(exist_ok=True)
    images = _card_images(pipeline_dir)
    for name, path in images.items():
        shutil.copyfile(path, staging / "images" / name)
    if "samples.png" not in images:
        _hero_image(pipeline_dir, staging / "images" / "samples.png")
    names = sorted(p.name for p in (staging / "images").iterdir())
    build_model_card(pipeline_dir, repo_id, names, license, space_id).save(staging / "README.md")
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def push_pipeline(model: str | Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                  commit_message: Optional[str] = None, license: str = "apache-2.0",
                  staging_dir: Optional[str | Path] = None, space_id: Optional[str] = None,
                  token: Optional[str] = None) -> str:
    """Stage the pipeline with its card and upload it with `create_repo` + `upload_folder`; returns the commit URL.
    `token` overrides HF_TOKEN and the stored login (diffusers' --hub_token); it is written nowhere."""
    require_token(token)
    with tempfile.TemporaryDirectory(prefix="flowers-ddpm-push-") as tmp:
        staging = Path(staging_dir) if staging_dir else Path(tmp) / "upload"
        files = stage_upload(model, staging, repo_id, license, space_id)
        api = HfApi(token=token)  # None: HF_TOKEN or the stored login, resolved by huggingface_hub itself
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
            logger.info("uploading %d files to %s", len(files), repo_url.repo_id)
            commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(staging), revision=revision,
                                       commit_message=commit_message or "Upload DDPM pipeline with flowers_ddpm")
        except (HfHubHTTPError, OSError) as e:  # refused, no access, offline
            raise UserError(f"pushing to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return commit.commit_url
