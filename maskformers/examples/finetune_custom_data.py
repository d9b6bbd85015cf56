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
# # Fine-tuning on your own data: a semantic folder and COCO panoptic, evaluation, export to transformers
#
# We write a small dataset to disk in the two layouts people bring most often, check it, fine-tune a model on
# each, evaluate before and after, segment an image with the result, and export it to transformers' layout
# (the folder `Mask2FormerForUniversalSegmentation.from_pretrained` reads).
#
# Run it as a script (`python -m maskformers.examples.finetune_custom_data`) or as a notebook
# (`jupytext --to ipynb finetune_custom_data.py`). It starts from the small model shipped with maskformers, so
# it runs offline in a few minutes on a CPU; with real data start from a hub checkpoint
# (`MASKFORMERS_EXAMPLE_MODEL=facebook/mask2former-swin-tiny-ade-semantic`) and train longer.

# %%
import json
import os
from pathlib import Path

import torch

import maskformers
from maskformers import cli
from maskformers.evaluation.evaluate import evaluate_model
from maskformers.training.readers_coco import CocoPanoptic
from maskformers.training.readers_semantic import SemanticFolder
from maskformers.training.synthetic_files import write_coco_panoptic, write_id2label, write_semantic_folder

MODEL = os.environ.get("MASKFORMERS_EXAMPLE_MODEL", "builtin")
STEPS = int(os.environ.get("MASKFORMERS_EXAMPLE_STEPS", "100"))
IMAGES = int(os.environ.get("MASKFORMERS_EXAMPLE_IMAGES", "48"))  # training images per dataset (val: a quarter)
WORK = Path(os.environ.get("MASKFORMERS_EXAMPLE_OUT", "example-outputs/finetune"))
DATA, RUNS = WORK / "data", WORK / "runs"
for run in ("sem", "coco"):  # one run per folder: rerunning this example starts over
    if (RUNS / run).exists():
        import shutil

        shutil.rmtree(RUNS / run)

# %% [markdown]
# ## 1. The data, on disk
#
# A **semantic folder**: images and label PNGs with the same stem, one class id per pixel (255 = ignore),
# and the class names in `id2label.json`. **COCO panoptic**: images, PNGs whose colour encodes a segment id
# (R + 256 G + 256² B) and a JSON listing each image's segments with their category. Here we draw synthetic
# scenes into both layouts; the semantic one has 5 classes of its own ("shape" for every shape, and four kinds
# of ground), so fine-tuning gives the model a new class head.

# %%
for split, n, seed in (("train", IMAGES, 7), ("val", max(IMAGES // 4, 2), 8)):
    write_semantic_folder(DATA / "sem/images" / split, DATA / "sem/labels" / split, n=n, seed=seed)
    write_coco_panoptic(DATA / f"coco/{split}2017", DATA / f"coco/panoptic_{split}2017",
                        DATA / f"coco/panoptic_{split}2017.json", n=n, seed=seed + 10)
write_id2label(DATA / "sem/id2label.json")
print(json.loads((DATA / "sem/id2label.json").read_text()))
print(sorted(p.name for p in (DATA / "sem/labels/train").iterdir())[:3], "...")

# %% [markdown]
# `maskformers check-data` reads every sample once and reports every problem in one go (colour masks,
# unknown class ids, sizes that differ, binary 0/255 masks...), with class counts and ground-truth overlays
# of the first images: look at them before training.

# %%
rc = cli.main(["check-data", "--data", "semantic-folder", "--images", str(DATA / "sem/images/train"),
               "--labels", str(DATA / "sem/labels/train"), "--id2label", str(DATA / "sem/id2label.json"),
               "--overlays", "2", "--overlay-dir", str(WORK / "check-data"), "--quiet"])
assert rc == 0, "check-data found problems: read them above"

# %% [markdown]
# ## 2. Fine-tune on the semantic folder
#
# `maskformers.finetune` is what `maskformers train` runs: it replaces the class head when the data's classes
# differ (rows of classes with the same name kept), derives the crop and the task from the data (printed first),
# evaluates every `eval_every` steps, and writes `final/` and `best/` model folders that carry the
# preprocessing they were trained with, plus `run_config.json` and `log.jsonl`.

# %%
labels = {int(k): v for k, v in json.loads((DATA / "sem/id2label.json").read_text()).items()}
sem_train = SemanticFolder(DATA / "sem/images/train", DATA / "sem/labels/train", id2label=labels)
sem_val = SemanticFolder(DATA / "sem/images/val", DATA / "sem/labels/val", id2label=labels)
result = maskformers.finetune(MODEL, sem_train, val_data=sem_val, out=RUNS / "sem", max_steps=STEPS,
                              batch_size=2, eval_every=max(STEPS // 2, 1), seed=0, progress=False,
                              on_eval=lambda step, metrics: print(f"  step {step}: mIoU {metrics['mIoU']:.1f}"))
print("saved:", result.final, result.best_model)

# %%
semantic_model = maskformers.from_pretrained(result.best_model)
metrics = evaluate_model(semantic_model, sem_val, task="semantic")
print(f"semantic folder, after fine-tuning: mIoU {metrics['mIoU']:.1f}, pixel accuracy {metrics['pACC']:.1f}")

# %% [markdown]
# ## 3. Fine-tune on COCO panoptic
#
# The model keeps its class head when the data's classes are its own (here: the built-in model's). PQ before
# and after, on the validation images:

# %%
coco_train = CocoPanoptic(DATA / "coco/train2017", DATA / "coco/panoptic_train2017",
                          DATA / "coco/panoptic_train2017.json")
coco_val = CocoPanoptic(DATA / "coco/val2017", DATA / "coco/panoptic_val2017", DATA / "coco/panoptic_val2017.json")
start = maskformers.from_pretrained(MODEL)
before = evaluate_model(start, coco_val, task="panoptic")
result = maskformers.finetune(start, coco_train, val_data=coco_val, out=RUNS / "coco", max_steps=STEPS,
                              batch_size=2, eval_every=max(STEPS // 2, 1), seed=0, progress=False)
panoptic_model = maskformers.from_pretrained(result.best_model)
after = evaluate_model(panoptic_model, coco_val, task="panoptic")
print(f"COCO panoptic: PQ {before['PQ']:.1f} before, {after['PQ']:.1f} after "
      f"(things {after['PQ_th']:.1f}, stuff {after['PQ_st']:.1f})")

# %% [markdown]
# ## 4. Use the fine-tuned model
#
# The saved folder works everywhere a checkpoint does: `maskformers segment IMAGE --model FOLDER`, the demo
# page (`maskformers serve --model FOLDER`), and Python, where its processor resizes as training did.

# %%
from maskformers import post_process_semantic  # noqa: E402
from maskformers.processing.visualize import overlay_segments  # noqa: E402

processor = maskformers.ImageProcessor.from_pretrained(RUNS / "sem/best")
image_path = sem_val.pairs[0][0]
inputs = processor([image_path])
with torch.inference_mode():
    out = semantic_model(inputs["pixel_values"])
segmentation = post_process_semantic(out.class_logits, out.mask_logits, input_size=inputs["pixel_values"].shape[-2:],
                                     image_sizes=inputs["image_sizes"], target_sizes=inputs["original_sizes"])[0]
classes = [{"id": c, "label_id": c} for c in segmentation.unique().tolist()]
overlay = overlay_segments(image_path, segmentation, classes, id2label=semantic_model.id2label)
overlay.save(WORK / "semantic_overlay.png")
print(f"classes found in {image_path.name}: {[semantic_model.id2label[c['id']] for c in classes]}; "
      f"overlay in {WORK / 'semantic_overlay.png'}")

# %% [markdown]
# ## 5. Export to transformers
#
# `save_pretrained(folder, format="transformers")` (or `maskformers export RUN/best OUT --to transformers`)
# writes `config.json`, `model.safetensors` and `preprocessor_config.json` in transformers' names. It warns
# once that transformers' processor cannot pad to a multiple of 32 as our training did, so on image sides that
# are not multiples of 32 the two libraries see slightly different inputs; on the 96x128 input below they agree.

# %%
import warnings  # noqa: E402

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    semantic_model.save_pretrained(WORK / "exported-to-transformers", format="transformers")
for w in caught:
    print("note:", w.message)
print(sorted(p.name for p in (WORK / "exported-to-transformers").iterdir()))

try:
    from transformers import Mask2FormerForUniversalSegmentation
except ImportError:
    print("transformers is not installed: pip install transformers to load the exported folder")
else:
    theirs = Mask2FormerForUniversalSegmentation.from_pretrained(WORK / "exported-to-transformers").eval()
    x = inputs["pixel_values"]
    with torch.inference_mode():
        ours_logits = semantic_model(x).class_logits
        their_logits = theirs(pixel_values=x).class_queries_logits
    print(f"transformers vs maskformers, class logits: max difference "
          f"{(ours_logits - their_logits).abs().max().item():.1e}")
