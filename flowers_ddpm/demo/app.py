"""The Gradio page of `flowers-ddpm demo` (and of the Space that `push --space_id` stages): controls for a
`generation.Request`, the image grid, the denoising strip and the time taken.

Gradio is an extra (`pip install -e ".[demo]"`), imported only when a page is built. Mistakes a user can make (a
folder that is not a pipeline, an unknown class, steps out of range) come back as a one-line message on the page,
and the server keeps serving.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

from ..errors import UserError
from .generation import MAX_IMAGES, OWN_SAMPLER, DemoModel, Request, interval_text

logger = logging.getLogger(__name__)
INSTALL_HINT = 'the demo needs gradio, which is not installed: pip install -e ".[demo]" (or pip install gradio)'
# small images shown large with sharp pixels; the served file keeps its size (it is the PNG `sample` writes)
CSS = ("#grid img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"
       " #strip img { image-rendering: pixelated; }")


def import_gradio():
    """gradio, or a UserError (exit code 2) that says how to install it."""
    try:
        return importlib.import_module("gradio")
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def build_demo(model: str | DemoModel, device: Optional[str] = None, allow_model_change: bool = True):
    """The page (a `gradio.Blocks`) for `model` (a pipeline folder, Hub id or a loaded DemoModel). With
    `allow_model_change` the page also loads other models (never on a Space: it serves the model it was made for)."""

    gr = import_gradio()
    current = {"model": model if isinstance(model, DemoModel) else DemoModel(model, device)}
    loaded: DemoModel = current["model"]

    def conditioning_updates(m: DemoModel) -> list:
        names = m.class_names
        return [gr.update(choices=names or [], value=[], visible=names is not None),
                gr.update(value=m.default_guidance_scale, visible=m.conditional),
                gr.update(value=interval_text(m.default_guidance_interval), visible=m.conditional),
                gr.update(value=m.default_classifier_scale, visible=m.classifier is not None),
                gr.update(choices=sampler_choices(m), value=m.default_sampler)]

    def on_load(name: str):
        try:
            current["model"] = DemoModel(name.strip(), device)
        except UserError as e:
            return [gr.update()] * 5 + [f"error: {e} (still serving {current['model'].model})"]
        except Exception as e:  # the page shows one line; the server log keeps the traceback
            logger.exception("loading %s failed", name)
            return [gr.update()] * 5 + [f"error: cannot load {name}: {type(e).__name__}: {_first_line(e)}"]
        return conditioning_updates(current["model"]) + [f"loaded {name}"]

    def on_generate(num_images, seed, sampler, steps, classes, guidance_scale, guidance_interval, classifier_scale):
        request = Request(num_images=num_images, seed=seed, sampler=sampler or None, steps=steps,
                          classes=list(classes or []), guidance_scale=guidance_scale,
                          guidance_interval=guidance_interval or "", classifier_scale=classifier_scale)
        try:
            result = current["model"].run(request)
        except UserError as e:
            return None, None, f"error: {e}"
        except Exception as e:  # the page shows one line; the server log keeps the traceback
            logger.exception("generating failed for %s", request)
            return None, None, f"error: generation failed: {type(e).__name__}: {_first_line(e)}"
        return result.grid, result.strip, result.summary

    with gr.Blocks(title="flowers_ddpm demo", analytics_enabled=False) as demo:
        gr.Markdown("# Diffusion model demo\nImage *i* is drawn with seed + *i*: the same settings give the same "
                    "images as `flowers-ddpm sample`.")
        with gr.Row():
            model_box = gr.Textbox(loaded.model, label="model (pipeline folder or Hub id)",
                                   interactive=allow_model_change, elem_id="model", scale=4)
            load = gr.Button("Load model", visible=allow_model_change, elem_id="load", scale=1)
        with gr.Row():
            with gr.Column(scale=1):
                num_images = gr.Slider(1, MAX_IMAGES, value=Request.num_images, step=1, label="number of images",
                                       elem_id="num_images")
                seed = gr.Number(Request.seed, precision=0, label="seed", elem_id="seed")
                sampler = gr.Dropdown(sampler_choices(loaded), value=loaded.default_sampler, label="sampler",
                                      elem_id="sampler")
                steps = gr.Number(Request.steps, precision=0, label="steps", elem_id="steps")
                names = loaded.class_names
                classes = gr.Dropdown(names or [], value=[], multiselect=True, allow_custom_value=True,
                                      label="classes (image i gets the i-th, cycling; none: unconditional)",
                                      visible=names is not None, elem_id="classes")
                guidance = gr.Slider(0, 10, value=loaded.default_guidance_scale, step=0.1,
                                     label="classifier-free guidance scale (1: the conditional model)",
                                     visible=loaded.conditional, elem_id="guidance_scale")
                interval = gr.Textbox(interval_text(loaded.default_guidance_interval),
                                      label="guidance interval: noise levels LO HI, classifier-free guidance only "
                                            "at LO <= sigma <= HI (blank: every step)",
                                      placeholder="every step", visible=loaded.conditional,
                                      elem_id="guidance_interval")
                classifier_scale = gr.Slider(0, 20, value=loaded.default_classifier_scale, step=0.1,
                                             label="classifier guidance scale (0: off)",
                                             visible=loaded.classifier is not None, elem_id="classifier_scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Textbox(label="status", interactive=False, elem_id="status")
                grid = gr.Image(label="samples", type="pil", format="png", interactive=False, height=420,
                                elem_id="grid")
                strip = gr.Image(label="denoising: x_t of the first image", type="pil", format="png",
                                 interactive=False, elem_id="strip")
        # one pipeline serves everyone: loading and generating take turns
        button.click(on_generate, [num_images, seed, sampler, steps, classes, guidance, interval, classifier_scale],
                     [grid, strip, status], concurrency_id="pipeline", concurrency_limit=1)
        load.click(on_load, [model_box], [classes, guidance, interval, classifier_scale, sampler, status],
                   concurrency_id="pipeline", concurrency_limit=1)
    return demo


def sampler_choices(model: DemoModel) -> list[tuple[str, str]]:
    """(label, value) pairs: the pipeline's own scheduler, then the `sample` command's samplers for its family."""
    return [(f"pipeline's own ({model.own_sampler})", OWN_SAMPLER)] + [(name, name) for name in model.samplers]


def serve(demo, host: Optional[str] = None, port: Optional[int] = None, share: bool = False) -> None:
    """Serve the page until interrupted (host and port None: gradio's defaults or GRADIO_SERVER_NAME/_PORT)."""
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, show_error=False, css=CSS)
    except OSError as e:  # port taken, address not available
        raise UserError(f"cannot serve the demo on {host}:{port}: {_first_line(e)}") from None


def launch_demo(model: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                device: Optional[str] = None) -> None:
    """`flowers-ddpm demo`: check that gradio is there, load the model, serve the page."""
    import_gradio()  # before the model loads: a missing extra is the first thing to say
    serve(build_demo(model, device), host, port, share)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
