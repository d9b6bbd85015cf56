"""``maskformers serve``: a local web page to try a model, built with Gradio (the convention of the hub's demo
spaces; ``pip install "maskformers[demo]"``).

    maskformers serve                                   # the built-in model: works offline
    maskformers serve --model facebook/mask2former-swin-tiny-coco-panoptic --port 7860

A person uploads an image and picks the task (for a OneFormer that is its prompt, "the task is ..."), and the
page shows the overlay, the table of segments (label, score, area) and the time taken. The inference is the one
of ``maskformers segment`` (:class:`maskformers.segment_runner.SegmentRunner`, the same post-processing, the
same overlays, small images shown enlarged); :class:`Segmenter` is that logic without Gradio. A file that is not
an image gives a message in the page, not a stack trace.

Gradio is imported by this command only, never by ``import maskformers``; the page runs with analytics off
(``GRADIO_ANALYTICS_ENABLED=False``), no share link, no server-side rendering and the system's fonts, so it
makes no request outside the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["add_serve_parser", "run_serve", "Segmenter", "PageResult", "build_app", "TABLE_HEADERS"]

TASKS = ("panoptic", "semantic", "instance")
TABLE_HEADERS = ["id", "label", "score", "area (px)"]
DISPLAY_HEIGHT = 512  # smaller images are shown enlarged to this height (nearest neighbour)
BUILTIN = "builtin"


@dataclass
class PageResult:
    """What the page shows for one request: the overlay (None on failure), table rows and a markdown line."""

    overlay: Any = None  # PIL.Image.Image
    rows: list[list[Any]] = field(default_factory=list)  # TABLE_HEADERS
    message: str = ""
    ok: bool = False


class Segmenter:
    """An uploaded file + task + threshold -> :class:`PageResult`, through the segment command's pipeline."""

    def __init__(self, model: Any, *, name: str, device: str = "cpu") -> None:
        import torch

        from .models.oneformer import OneFormer

        self.model, self.name, self.device = model, name, torch.device(device)
        self.is_oneformer = isinstance(model, OneFormer)
        self.id2label = dict(model.id2label)
        self._runners: dict[str, Any] = {}

    def prompt(self, task: str) -> str:
        """The text a OneFormer is conditioned on for ``task`` (empty for a Mask2Former)."""
        return f"the task is {task}" if self.is_oneformer else ""

    def _runner(self, task: str) -> Any:
        import torch

        from .segment_runner import SegmentRunner

        if task not in self._runners:
            self._runners[task] = SegmentRunner(self.model, task=task, device=self.device, dtype=torch.float32)
        return self._runners[task]

    def __call__(self, path: str | None, task: str, threshold: float = 0.5) -> PageResult:
        from .cli_segment import segment_records, segments_for_task
        from .processing import ImageLoadError, load_image
        from .processing.visualize import font_size_for, overlay_segments, scale_for_display

        if not path:
            return PageResult(message="Upload an image to segment.")
        if task not in TASKS:
            return PageResult(message=f"**Unknown task {task!r}**: pick one of {', '.join(TASKS)}.")
        name = Path(path).name
        try:
            image = load_image(path)
        except (ImageLoadError, OSError) as exc:
            reason = str(exc).replace(str(path), name)
            return PageResult(message=f"**{name} is not an image that can be read.** {reason[:1].upper()}{reason[1:]}")
        failures: list[tuple[str, str]] = []
        post = {} if task == "semantic" else {"threshold": float(threshold)}
        runner = self._runner(task)
        start = time.perf_counter()
        result = runner([(name, image)], post, failures, warn=lambda message: None)[0]
        elapsed = time.perf_counter() - start
        if result is None:
            reason = failures[0][1] if failures else "unknown error"
            return PageResult(message=f"**Could not segment {name}:** {reason}")
        segmentation, segments, offset = segments_for_task(task, result, runner.is_oneformer)
        segmentation = segmentation.cpu()
        records = segment_records(segmentation, segments, offset, self.id2label)
        shown, maps = image, [segmentation]
        if image.height < DISPLAY_HEIGHT:
            shown, maps = scale_for_display(image, maps, height=DISPLAY_HEIGHT)
        font_size = max(font_size_for(shown.height, shown.width), round(shown.height / 32))  # readable when fitted
        overlay = overlay_segments(shown, maps[0], segments, id2label=self.id2label, font_size=font_size)
        rows = [[r["id"], r["label"], f"{r['score']:.3f}" if "score" in r else "", r["area"]] for r in records]
        prompt = f', prompt "{self.prompt(task)}"' if self.is_oneformer else ""
        message = (f"{len(rows)} segments in {elapsed * 1000:.0f} ms ({task}{prompt}; {self.name} on "
                   f"{self.device.type}; {image.width}x{image.height} px)")
        return PageResult(overlay=overlay, rows=rows, message=message, ok=True)


def build_app(segmenter: Segmenter) -> Any:
    """The Gradio page (a ``gradio.Blocks``) around ``segmenter``; ``.launch()`` serves it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    kind = "OneFormer" if segmenter.is_oneformer else "Mask2Former"
    classes = ", ".join(segmenter.id2label[i] for i in sorted(segmenter.id2label)[:12])
    more = f" and {len(segmenter.id2label) - 12} more" if len(segmenter.id2label) > 12 else ""

    def run(path: str | None, task: str, threshold: float) -> tuple[Any, list[list[Any]], str]:
        result = segmenter(path, task, threshold)
        return result.overlay, result.rows, result.message

    with gr.Blocks(title=f"maskformers: {segmenter.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## maskformers: {segmenter.name}\n{kind}, {len(segmenter.id2label)} classes: {classes}{more}.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                task = gr.Dropdown(list(TASKS), value="panoptic", label="Task", elem_id="task")
                prompt = gr.Textbox(segmenter.prompt("panoptic"), label="OneFormer task prompt", interactive=False,
                                    visible=segmenter.is_oneformer, elem_id="prompt")
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Score threshold (panoptic, instance)",
                                      elem_id="threshold")
                button = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image to segment.", elem_id="status")
                overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["number", "str", "str", "number"],
                                     interactive=False, label="Segments", elem_id="segments")
        task.change(segmenter.prompt, task, prompt)
        inputs, outputs = [upload, task, threshold], [overlay, table, status]
        upload.upload(run, inputs, outputs)
        button.click(run, inputs, outputs)
    return app


# ------------------------------------------------------------------------------------------------
# maskformers serve
# ------------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be a TCP port number in [1, 65535], got {text!r}")
    return value


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="a local web page to segment uploaded images (needs the [demo] extra)")
    p.add_argument("--model", default=BUILTIN, help="hub id or folder, or 'builtin' (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port (default 7860)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    p.set_defaults(run=run_serve)
    return p


def _load(name: str) -> Any:
    if name != BUILTIN:
        from .hub import from_pretrained

        return from_pretrained(name)
    from .training.builtin import BUILTIN_IMAGE_SIZE, load_builtin_model

    model = load_builtin_model()
    if model.preprocessor_config is None:  # trained on 128 px scenes: bring uploads to that scale
        model.preprocessor_config = {"size": {"shortest_edge": BUILTIN_IMAGE_SIZE,
                                              "longest_edge": 4 * BUILTIN_IMAGE_SIZE}}
    return model


def run_serve(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if find_spec("gradio") is None:
        print("maskformers serve: needs Gradio, which is not installed: pip install \"maskformers[demo]\"",
              file=sys.stderr)
        return 2
    from .cli_segment import UsageError, _check_device
    from .hub import CheckpointError

    try:
        device = _check_device(args.device)
        segmenter = Segmenter(_load(args.model), name=args.model, device=str(device))
    except UsageError as exc:
        print(f"maskformers serve: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError, TypeError) as exc:
        print(f"maskformers serve: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts to download
    print(f"maskformers serve: {args.model} on http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
    build_app(segmenter).launch(server_name=args.host, server_port=args.port, share=False, theme=theme,
                                ssr_mode=False, mcp_server=False, max_file_size="50mb", quiet=True)
    return 0
