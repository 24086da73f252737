"""The training report in <output_dir>/report/: loss curve, sample grids over training, a denoising progression.

Reads only what a run wrote (the run log report/loss.jsonl, samples/, the exported pipeline/), never the trainer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

from ..pipelines.sampling import load_pipeline, make_scheduler
from .run_log import loss_curve

logger = logging.getLogger(__name__)
TRAINING_INFO = "training_info.json"
FINAL_SAMPLES, SAMPLES_OVER_TRAINING = "final_samples.png", "samples_over_training.png"
LOSS_CURVE, DENOISING = "loss_curve.png", "denoising.png"


def write_training_info(pipeline_dir: Path, step: int, seconds: float, hardware: str,
                        speed: Optional[dict] = None) -> None:
    """Facts about the run that the model card reports (steps, wall-clock time, hardware), and how its speed
    settings were chosen (`speed`: mixed_precision, channels_last, compile, each with the setting, what ran, how it
    was chosen and the timed figures when it was measured)."""
    info = {"global_step": step, "training_seconds": round(seconds, 1), "hardware": hardware, **(speed or {})}
    (Path(pipeline_dir) / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")


def image_size(pipeline_dir: Path) -> Optional[int]:
    """The px of the images a pipeline folder generates (its UNet's sample_size), None when unknown."""
    config = Path(pipeline_dir) / "unet" / "config.json"
    size = json.loads(config.read_text()).get("sample_size") if config.is_file() else None
    return size if isinstance(size, int) else size[0] if isinstance(size, (list, tuple)) else None


def plot_loss_curve(output_dir: str | Path, out: Path) -> Optional[Path]:
    """The run's loss against optimizer step as a PNG; None when nothing was logged."""
    steps, losses = loss_curve(output_dir)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


MIN_SHOWN_PX = 64  # images smaller than this are enlarged (nearest neighbour) in everything people look at


def enlarge(image: Image.Image, image_size: int, minimum: int = MIN_SHOWN_PX) -> Image.Image:
    """`image` (one image or a grid of images of `image_size` px) enlarged by a whole factor with nearest
    neighbour, so each image is at least `minimum` px on screen; unchanged when it already is."""
    scale = max(1, -(-minimum // max(image_size, 1)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def labelled_row(tiles: Sequence[Image.Image], labels: Sequence[str], image_size: Optional[int] = None,
                 gap: int = 0) -> Image.Image:
    """Tiles side by side, `gap` px apart, each with a caption strip above it. Tiles are single images, or grids of
    images of `image_size` px; small images are enlarged so each is at least 64 px and captions fit."""
    caption = 14
    tiles = [enlarge(t, image_size or min(t.width for t in tiles)) for t in tiles]
    width, height = max(t.width for t in tiles) + gap, max(t.height for t in tiles)
    row = Image.new("RGB", (width * len(tiles) - gap, height + caption), "white")
    draw = ImageDraw.Draw(row)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        row.paste(tile, (i * width, caption))
        draw.text((i * width + 2, 1), label, fill="black")
    return row


def evenly_spaced(count: int, picks: int) -> list[int]:
    """`picks` (or all `count`) indices from 0 to count - 1, evenly spaced, always with the first and the last."""
    if count <= picks:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(picks - 1, 1)) for i in range(picks)})


def samples_over_training(samples_dir: Path, out: Path, max_columns: int = 6,
                          image_size: Optional[int] = None) -> Optional[Path]:
    """The sample grids at (up to) `max_columns` evenly spaced steps, the last one included, labelled with their
    step; `image_size`: the px of one image in the grids (small ones are enlarged)."""
    grids = sorted(samples_dir.glob("step-*.png"))
    if not grids:
        return None
    chosen = [grids[i] for i in evenly_spaced(len(grids), max_columns)]
    labelled_row([Image.open(p).convert("RGB") for p in chosen],
                 [f"step {int(p.stem.split('-')[1])}" for p in chosen], image_size, gap=4).save(out)
    return out


def strip_indices(steps: int, columns: int) -> set[int]:
    """Which of the states x_T .. x_0 of `steps` sampling steps a denoising strip shows: `columns` evenly spaced
    indices into the steps taken, 0 = the initial noise, `steps` = the image."""
    return {round(i * steps / (columns - 1)) for i in range(columns)}


@torch.inference_mode()
def denoising_strip(pipe, out: Path, seeds: Sequence[int] = (0, 1, 2), columns: int = 6, steps: int = 50,
                    scheduler: Optional[str] = None) -> Path:
    """One row per seed: x_t at `columns` evenly spaced points of sampling, from pure noise to the image.

    This repeats DDPMPipeline's sampling loop because the pipeline returns only the final image, not x_t.
    """
    unet = pipe.unet
    sched = make_scheduler(scheduler, pipe.scheduler.config) if scheduler else pipe.scheduler
    pipe.scheduler = sched
    # GuidedDDPMPipeline (class-conditional / learned variances) knows how to feed its UNet; plain UNets take (x, t)
    model_output = getattr(pipe, "scheduler_input", lambda x, t: unet(x, t).sample)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    keep = strip_indices(steps, columns)
    rows, labels = [], []
    for seed in seeds:
        sched.set_timesteps(steps)  # also resets multistep solvers' state (DPM-Solver++ fails without it)
        generator = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, unet.config.in_channels, *size), generator=generator).to(unet.device, unet.dtype)
        tiles, labels = [], []
        for i, t in enumerate(list(sched.timesteps) + [None]):
            if i in keep:
                tiles.append(tensor_to_image(x))
                labels.append("noise" if i == 0 else f"t={int(t)}" if t is not None else "t=0")
            if t is not None:
                x = sched.step(model_output(x, t), t, x, generator=generator).prev_sample
        rows.append(tiles)
    grid = [labelled_row(tiles, labels if r == 0 else [""] * len(tiles)) for r, tiles in enumerate(rows)]
    strip = Image.new("RGB", (grid[0].width, sum(g.height for g in grid)), "white")
    for r, row in enumerate(grid):
        strip.paste(row, (0, sum(g.height for g in grid[:r])))
    strip.save(out)
    return out


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """The first image of a batch in [-1, 1] as an RGB image."""
    array = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def write_report(output_dir: str | Path, steps: int = 50, scheduler: Optional[str] = None, seed: int = 0) -> Path:
    """Write loss_curve.png, samples_over_training.png, final_samples.png and denoising.png under report/."""
    output_dir = Path(output_dir)
    folder = output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plot_loss_curve(output_dir, folder / LOSS_CURVE)
    size = image_size(output_dir / "pipeline")
    if samples_over_training(output_dir / "samples", folder / SAMPLES_OVER_TRAINING, image_size=size):
        final = Image.open(sorted((output_dir / "samples").glob("step-*.png"))[-1])
        enlarge(final, size or final.width).save(folder / FINAL_SAMPLES)
    if (output_dir / "pipeline" / "model_index.json").is_file():
        pipe = load_pipeline(str(output_dir / "pipeline"), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        denoising_strip(pipe, folder / DENOISING, seeds=(seed, seed + 1, seed + 2), steps=steps, scheduler=scheduler)
    logger.info("training report written to %s", folder)
    return folder
