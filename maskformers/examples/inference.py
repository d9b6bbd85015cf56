# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Inference with Mask2Former and OneFormer
#
# Segment one image with both models and look at the three tasks: panoptic (things and stuff, each segment
# with an id), semantic (a class per pixel) and instance (things only, one id per object).
#
# Run it as a script (`python -m maskformers.examples.inference`) or as a notebook
# (`jupytext --to ipynb inference.py`). It downloads the published checkpoints from the Hugging Face hub; the
# environment variables below point it at other models or images (offline: `MASKFORMERS_EXAMPLE_MASK2FORMER=builtin`,
# the small model shipped with maskformers, which knows synthetic scenes of shapes over sky, grass, water, sand).

# %%
import os
import time
from pathlib import Path

import PIL.Image
import torch

import maskformers
from maskformers import post_process_instance, post_process_panoptic, post_process_semantic
from maskformers.processing.model_settings import class_info_of
from maskformers.processing.visualize import overlay_segments

MASK2FORMER = os.environ.get("MASKFORMERS_EXAMPLE_MASK2FORMER", "facebook/mask2former-swin-tiny-coco-panoptic")
ONEFORMER = os.environ.get("MASKFORMERS_EXAMPLE_ONEFORMER", "shi-labs/oneformer_ade20k_swin_tiny")
IMAGE = os.environ.get("MASKFORMERS_EXAMPLE_IMAGE")  # a photo of yours; default: a synthetic scene
OUT = Path(os.environ.get("MASKFORMERS_EXAMPLE_OUT", "example-outputs/inference"))
OUT.mkdir(parents=True, exist_ok=True)


def show(image: PIL.Image.Image, name: str) -> None:
    """Save ``image`` under OUT and, in a notebook, display it."""
    image.save(OUT / name)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(image)
    else:
        print(f"wrote {OUT / name} ({image.width}x{image.height})")


def print_segments(segments: list[dict], id2label: dict[int, str]) -> None:
    for s in segments:
        score = f"{s['score']:.2f}" if "score" in s else "    "
        print(f"  id {s['id']:3d}  {score}  {id2label.get(s['label_id'], s['label_id'])}")


# %% [markdown]
# ## The image
#
# Any path, PIL image, numpy array or tensor works. Without `MASKFORMERS_EXAMPLE_IMAGE` we draw a held-out
# synthetic scene (the data the built-in model was trained on).

# %%
if IMAGE:
    image = PIL.Image.open(IMAGE).convert("RGB")
else:
    from maskformers.training.synthetic import SyntheticScenes

    scene = SyntheticScenes(1, size=(192, 256), seed=1003)[0]  # two stuff regions, four shapes
    image = PIL.Image.fromarray(scene["image"].permute(1, 2, 0).numpy())
show(image, "image.png")

# %% [markdown]
# ## Mask2Former
#
# Three steps: the processor resizes and normalises as the checkpoint was trained (its
# `preprocessor_config.json`), the model predicts `class_logits` (B, Q, K+1) and `mask_logits`
# (B, Q, H/4, W/4) for Q queries, and post-processing turns them into segments at the image's size.

# %%
model = maskformers.from_pretrained(MASK2FORMER)
processor = maskformers.ImageProcessor.from_pretrained(MASK2FORMER)
inputs = processor([image])
start = time.perf_counter()
with torch.inference_mode():
    out = model(inputs["pixel_values"])
print(f"{type(model).__name__}: {inputs['pixel_values'].shape[-2:]} input, "
      f"{1000 * (time.perf_counter() - start):.0f} ms; class_logits {tuple(out.class_logits.shape)}, "
      f"mask_logits {tuple(out.mask_logits.shape)}")
geometry = dict(input_size=inputs["pixel_values"].shape[-2:], image_sizes=inputs["image_sizes"],
                target_sizes=inputs["original_sizes"])

# %% [markdown]
# Panoptic: each pixel belongs to one segment (id from 1; 0 = no segment above the threshold).

# %%
panoptic = post_process_panoptic(out.class_logits, out.mask_logits, threshold=0.8, **geometry)[0]
print_segments(panoptic["segments_info"], model.id2label)
show(overlay_segments(image, panoptic["segmentation"], panoptic["segments_info"], id2label=model.id2label),
     "mask2former_panoptic.png")

# %% [markdown]
# Semantic: a class id per pixel (every query's mask weighted by its class probabilities).

# %%
semantic = post_process_semantic(out.class_logits, out.mask_logits, **geometry)[0]
classes = [{"id": c, "label_id": c} for c in semantic.unique().tolist()]
print_segments(classes, model.id2label)
show(overlay_segments(image, semantic, classes, id2label=model.id2label), "mask2former_semantic.png")

# %% [markdown]
# Instance: Mask2Former scores every (query, class) pair and keeps the best; its instance ids start at 0
# (-1 = none), and its masks may overlap (`return_masks=True` gives them). `thing_ids` keeps the countable
# classes: a fine-tuned model (and the built-in one) carries its thing/stuff split; the COCO checkpoints'
# things are the ids below 80.

# %%
info = class_info_of(model)
things = info.thing_ids if info is not None else [i for i in model.id2label if i < 80]
instance = post_process_instance(out.class_logits, out.mask_logits, threshold=0.5, thing_ids=things, **geometry)[0]
print_segments(instance["segments_info"], model.id2label)
show(overlay_segments(image, instance["segmentation"] + 1,
                      [{**s, "id": s["id"] + 1} for s in instance["segments_info"]], id2label=model.id2label),
     "mask2former_instance.png")

# %% [markdown]
# ## OneFormer
#
# One model for the three tasks: the task is a text prompt ("the task is semantic") that the processor turns
# into CLIP token ids (`task_inputs`, (B, 77)) and the model into the queries' task token. Post-processing
# follows OneFormer's rules (`model="oneformer"`): the class info of the checkpoint says which classes are
# things (instances) and which are stuff (merged into one segment per class in panoptic results).

# %%
oneformer = maskformers.from_pretrained(ONEFORMER)
oneformer_processor = maskformers.OneFormerProcessor.from_pretrained(ONEFORMER)
info = oneformer_processor.class_info  # names and thing ids, when the checkpoint carries them
for task in ("semantic", "instance", "panoptic"):
    inputs = oneformer_processor([image], task)
    with torch.inference_mode():
        out = oneformer(inputs["pixel_values"], inputs["task_inputs"])
    geometry = dict(input_size=inputs["pixel_values"].shape[-2:], image_sizes=inputs["image_sizes"],
                    target_sizes=inputs["original_sizes"], model="oneformer")
    if task == "semantic":
        segmentation = post_process_semantic(out.class_logits, out.mask_logits, **geometry)[0]
        segments = [{"id": c, "label_id": c} for c in segmentation.unique().tolist()]
    elif task == "instance":
        things = None if info is None else info.thing_ids
        result = post_process_instance(out.class_logits, out.mask_logits, thing_ids=things, **geometry)[0]
        segmentation, segments = result["segmentation"], result["segments_info"]
    else:
        stuff = None if info is None else info.stuff_ids
        result = post_process_panoptic(out.class_logits, out.mask_logits, label_ids_to_fuse=stuff, **geometry)[0]
        segmentation, segments = result["segmentation"], result["segments_info"]
    print(f"OneFormer, {task}: {len(segments)} segments")
    print_segments(segments, oneformer.id2label)
    show(overlay_segments(image, segmentation, segments, id2label=oneformer.id2label), f"oneformer_{task}.png")
