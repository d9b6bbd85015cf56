"""OneFormer training: the task drawn per image and the targets and text inputs of each task against the
rules of the original's unified dataset mapper (transcribed below on its own data layout: a panoptic id map
plus segments_info), batching, the model/dataset checks, a few training steps on synthetic scenes (the
loss goes down, every parameter that should get a gradient gets one, resume repeats the run exactly), and
fine-tuning with a new label set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from maskformers.models.oneformer import OneFormerConfig, build_oneformer
from maskformers.processing.class_info import ClassInfo
from maskformers.processing.clip_tokenizer import CLIPTokenizer
from maskformers.training.config import TrainingConfig
from maskformers.training.criterion import _mix
from maskformers.training.data import TrainingDataset, collate
from maskformers.training.finetune import replace_class_head
from maskformers.training.loop import _average_criterion_grads, _micro_step, _step_target_counts, criterion_for, train
from maskformers.training.oneformer_data import (
    OneFormerTrainingDataset,
    draw_task,
    num_text_for,
    oneformer_targets,
)
from maskformers.training.synthetic import SYNTHETIC_CLASSES, SyntheticScenes
from oneformer_helpers import clip_bpe_file

TINY = dict(
    backbone={"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    num_classes=8, num_queries=8, hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, encoder_layers=1,
    encoder_ffn_dim=32, decoder_layers=2, decoder_ffn_dim=32, query_dec_layers=1, query_dropout=0.0,
    with_text_mapper=True, text_width=32, text_layers=1, text_heads=2, text_context_length=16, text_n_ctx=2,
)
TASKS = ("semantic", "instance", "panoptic")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file(clip_bpe_file())


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_oneformer(OneFormerConfig(**{**TINY, **overrides}), id2label=dict(enumerate(SYNTHETIC_CLASSES)))


def _dataset(reader, tokenizer, model, **kw):
    return OneFormerTrainingDataset(reader, tokenizer=tokenizer, num_text=num_text_for(model), text_seq_len=16, **kw)


# ------------------------------------------------------------------------------------ the original's rules
def _original_mapper(pan_seg, segments_info, task, class_names, things, num_text):
    """The unified mapper's per-task rule: (classes, masks, texts), written out from its description."""
    texts = [{"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "a panoptic photo"}[task]]
    texts = texts * num_text
    classes, masks, count = [], [], {name: 0 for name in class_names}
    for segment in segments_info:
        class_id = segment["category_id"]
        if (task == "instance" and class_id not in things) or segment["iscrowd"]:
            continue
        mask = pan_seg == segment["id"]
        if not mask.any():
            continue
        if task == "semantic" and class_id in classes:
            masks[classes.index(class_id)] = masks[classes.index(class_id)] | mask
            continue
        classes.append(class_id)
        masks.append(mask)
        count[class_names[class_id]] += 1
    filled = 0
    for name in class_names:
        for _ in range(count[name]):
            if filled < len(texts):
                texts[filled] = f"a photo with a {name}"
                filled += 1
    return classes, masks, texts


def _hand_made():
    """An 8x8 panoptic map: stuff 5 in two segments, stuff 4, things 2, 0, 2 (one crowd), a thing left empty."""
    pan = torch.zeros(8, 8, dtype=torch.int64)  # 0 = void
    pan[:3] = 11
    pan[3:5] = 12
    pan[5:] = 13
    pan[0, :2] = 21
    pan[6, 5:] = 22
    pan[4, 2:4] = 23
    pan[7, :2] = 24
    segments = [{"id": 21, "category_id": 2, "iscrowd": 0}, {"id": 11, "category_id": 5, "iscrowd": 0},
                {"id": 12, "category_id": 4, "iscrowd": 0}, {"id": 22, "category_id": 0, "iscrowd": 0},
                {"id": 13, "category_id": 5, "iscrowd": 0}, {"id": 23, "category_id": 2, "iscrowd": 1},
                {"id": 24, "category_id": 2, "iscrowd": 0}, {"id": 99, "category_id": 1, "iscrowd": 0}]
    sample = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8),
              "masks": torch.stack([pan == s["id"] for s in segments]),
              "labels": torch.tensor([s["category_id"] for s in segments]),
              "iscrowd": torch.tensor([bool(s["iscrowd"]) for s in segments]), "source": "hand-made"}
    return pan, segments, sample


@pytest.mark.parametrize("num_text", [12, 3])  # room for every prompt; fewer slots than segments
@pytest.mark.parametrize("task", TASKS)
def test_targets_and_texts_follow_the_original_mapper(task, num_text, tokenizer):
    pan, segments, sample = _hand_made()
    names = ("circle", "square", "triangle", "star", "sky", "grass", "water", "sand")
    info = ClassInfo(names=names, thing_ids=frozenset({0, 1, 2, 3}))
    classes, masks, texts = _original_mapper(pan, segments, task, names, info.thing_ids, num_text)
    target, ours = oneformer_targets(sample, task, info, num_text)
    assert target["labels"].tolist() == classes
    assert torch.equal(target["masks"], torch.stack(masks))
    assert ours == texts
    expected_classes = {"semantic": [2, 5, 4, 0], "instance": [2, 0, 2], "panoptic": [2, 5, 4, 0, 5, 2]}[task]
    assert classes == expected_classes  # the hand-made case exercises what it should

    reader = [sample]
    data = OneFormerTrainingDataset(reader, tokenizer=tokenizer, num_text=num_text, task=task, class_info=info,
                                    text_seq_len=16)
    _, item = data[0]
    assert item["task"] == task
    assert torch.equal(item["task_inputs"], tokenizer(f"The task is {task}")[0])  # the original's capitalised prompt
    assert item["task_inputs"].shape == (77,)
    assert torch.equal(item["text_inputs"], tokenizer(texts, context_length=16))


def test_task_draw_uses_the_original_thresholds_and_probabilities(tokenizer):
    assert [draw_task(u) for u in (0.0, 0.3299, 0.33, 0.6599, 0.66, 0.9999)] == \
        ["semantic", "semantic", "instance", "instance", "panoptic", "panoptic"]
    data = OneFormerTrainingDataset(SyntheticScenes(3000, size=16), tokenizer=tokenizer, seed=3)
    draws = [data.task_of(i) for i in range(3000)]
    for task, p in zip(TASKS, (0.33, 0.33, 0.34)):
        sigma = (3000 * p * (1 - p)) ** 0.5
        assert abs(draws.count(task) - 3000 * p) < 4 * sigma, (task, draws.count(task))
    assert draws == [data.task_of(i) for i in range(3000)]  # a function of (seed, epoch, index)
    data.set_epoch(1)
    again = [data.task_of(i) for i in range(3000)]
    assert 0.5 < sum(a != b for a, b in zip(draws, again)) / 3000 < 0.8  # redrawn every epoch
    fixed = OneFormerTrainingDataset(SyntheticScenes(4, size=16), tokenizer=tokenizer, task="instance")
    assert {fixed.task_of(i) for i in range(4)} == {"instance"}
    with pytest.raises(ValueError, match="semantic_prob <= instance_prob"):
        OneFormerTrainingDataset(SyntheticScenes(1, size=16), tokenizer=tokenizer, semantic_prob=0.7,
                                 instance_prob=0.5)


def test_batches_and_model_checks(tokenizer):
    model = _model()
    scenes = SyntheticScenes(2, size=64, seed=1)
    data = _dataset(scenes, tokenizer, model)
    batch = collate([data[0], data[1]])
    assert batch["task_inputs"].shape == (2, 77) and batch["text_inputs"].shape == (2, 6, 16)  # 8 queries - 2 ctx
    assert batch["tasks"] == [data.task_of(0), data.task_of(1)]
    assert set(batch["targets"][0]) == {"labels", "masks"}
    plain = TrainingDataset(scenes, task="panoptic")
    with pytest.raises(ValueError, match="1 of 2 targets carry 'task_inputs'"):
        collate([data[0], plain[1]])
    with pytest.raises(ValueError, match="the dataset gives num_text=5"):
        OneFormerTrainingDataset(scenes, tokenizer=tokenizer, num_text=5, text_seq_len=16).check_model(model)
    with pytest.raises(ValueError, match="text encoder reads 16 tokens"):
        OneFormerTrainingDataset(scenes, tokenizer=tokenizer, num_text=6).check_model(model)
    with pytest.raises(ValueError, match="no text mapper"):
        data.check_model(_model(with_text_mapper=False))
    OneFormerTrainingDataset(scenes, tokenizer=tokenizer).check_model(_model(with_text_mapper=False))
    with pytest.raises(ValueError, match="OneFormerTrainingDataset"):
        train(model, plain, config=TrainingConfig(max_steps=1), progress=False)


# ------------------------------------------------------------------------------------ training
def test_gradients_reach_every_parameter_on_all_three_tasks(tokenizer):
    model = _model()
    scenes = SyntheticScenes(3, size=64, seed=1)
    items = [_dataset(scenes, tokenizer, model, task=task)[i] for i, task in enumerate(TASKS)]
    batch = collate(items)
    assert batch["tasks"] == list(TASKS)
    criterion = criterion_for(model, TrainingConfig(num_points=200))
    assert criterion.weights["loss_contrastive"] == 0.5
    assert criterion.extra_terms["contrastive"].temperature == 0.07
    out = model(batch["pixel_values"], task_inputs=batch["task_inputs"], text_inputs=batch["text_inputs"])
    losses = criterion(out, batch["targets"])
    assert len(losses) == 3 * 3 + 1
    criterion.total(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]
    # as for Mask2Former (tests/test_training_criterion.py): the deformable layers start with zero offsets
    assert zero == ["pixel_decoder.level_embed"], f"zero gradient for {zero}"
    for part in ("task_encoder", "text_mapper", "query_transformer", "query_embed"):
        assert any(p.grad.abs().max() > 0 for n, p in model.named_parameters() if n.startswith(part)), part
    assert criterion.extra_terms["contrastive"].logit_scale.grad != 0

    # optimizer groups as the original's build_optimizer: no decay on norms and nn.Embedding tables
    from maskformers.training.optim import build_optimizer

    groups = build_optimizer(model, lr=1e-3, weight_decay=0.05, extra_modules=[criterion]).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"text_mapper.text_encoder.token_embedding.weight", "text_mapper.prompt_ctx.weight", "query_embed.weight",
            "text_mapper.text_encoder.final_norm.weight"} <= no_decay
    assert not {"text_mapper.text_encoder.positional_embedding", "task_encoder.mlp.layers.0.weight"} & no_decay
    assert [g["params"] for g in groups if g["name"] == "criterion"] == [[criterion.extra_terms["contrastive"]
                                                                          .logit_scale]]


def _fixed_loss(model, tokenizer, scenes, criterion):
    """The weighted loss of the same two scenes under each task (eval mode, keyed points)."""
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for task in TASKS:
            data = _dataset(scenes, tokenizer, model, task=task)
            batch = collate([data[0], data[1]])
            out = model(batch["pixel_values"], task_inputs=batch["task_inputs"], text_inputs=batch["text_inputs"])
            total += float(criterion.total(criterion(out, batch["targets"], image_keys=[1, 2])))
    model.train(was)
    return total


def test_training_lowers_the_loss_and_resumes_exactly(tokenizer, tmp_path):
    scenes = SyntheticScenes(2, size=64, seed=1)
    config = TrainingConfig(max_steps=5, batch_size=2, num_points=200, lr=3e-3, log_every=1, checkpoint_every=5)
    model = _model()
    criterion = criterion_for(model, config)
    before = _fixed_loss(model, tokenizer, scenes, criterion)
    full = train(model, _dataset(scenes, tokenizer, model), config=config, output_dir=tmp_path / "full",
                 progress=False)
    assert full.step == 5 and all("loss_contrastive" in r for r in full.losses)
    after = _fixed_loss(model, tokenizer, scenes, criterion)
    assert after < 0.9 * before, (before, after)

    resumed = _model()
    first = train(resumed, _dataset(scenes, tokenizer, resumed), config=config, output_dir=tmp_path / "split",
                  progress=False, stop_after=2)
    assert first.step == 2
    resumed = _model(seed=5)  # the checkpoint restores every weight
    second = train(resumed, _dataset(scenes, tokenizer, resumed), config=config, output_dir=tmp_path / "split",
                   progress=False, resume=True)
    assert second.step == 5
    assert [r["loss"] for r in first.losses + second.losses] == [r["loss"] for r in full.losses]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    from test_training_oneformer import _step_gradients
    from maskformers.processing.clip_tokenizer import CLIPTokenizer
    from maskformers.training.distributed import setup, teardown
    info = setup("cpu")
    grads = _step_gradients(CLIPTokenizer.from_bpe_file(sys.argv[2]), range(2 * info.rank, 2 * info.rank + 2),
                            info.world_size)
    torch.save(grads, f"{sys.argv[1]}/grads-{info.rank}.pt")
    teardown()
""")


def _step_gradients(tokenizer, rows, world_size=1):
    """Gradients of one loop micro-step (the loop's own functions) on scenes ``rows`` of four, under DDP when
    ``world_size`` > 1; the criterion's logit scale under "logit_scale"."""
    model = _model()
    criterion = criterion_for(model, TrainingConfig(num_points=200))
    data = _dataset(SyntheticScenes(4, size=64, seed=1), tokenizer, model)
    batch = collate([data[i] for i in rows])
    ddp = model if world_size == 1 else torch.nn.parallel.DistributedDataParallel(model)
    loss, _ = _micro_step(ddp, criterion, batch, [_mix(0, 0, i) for i in rows], _step_target_counts([batch]),
                          torch.device("cpu"), None)
    loss.backward()
    _average_criterion_grads(criterion, world_size)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["logit_scale"] = criterion.extra_terms["contrastive"].logit_scale.grad.detach().clone()
    return grads


def test_two_processes_compute_the_gradients_of_one(tokenizer, tmp_path):
    """Under torchrun (2 processes x 2 images) the gradients are those of one process with the 4 images: the
    contrastive term takes its negatives from both processes (a differentiable all-gather), and the logit
    scale, which lives outside DDP, is averaged like the model's gradients."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29527", str(script),
           str(tmp_path), str(clip_bpe_file()), str(tests)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = _step_gradients(tokenizer, range(4))
    rank0, rank1 = (torch.load(tmp_path / f"grads-{r}.pt") for r in (0, 1))
    assert one["logit_scale"] != 0
    for name, expected in one.items():
        assert torch.equal(rank0[name], rank1[name]), name  # every process steps the same update
        # the same gradients up to float32 summation order (gloo adds in another order than one process)
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(rank0[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_finetune_replaces_the_oneformer_class_head(tokenizer, tmp_path):
    model = _model(with_text_mapper=False)
    old_head = model.transformer_decoder.head.class_embed
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if "class_embed" not in n}
    new_labels = {0: "circle", 1: "blob", 2: "sky"}
    replace_class_head(model, new_labels, keep_matching=True)
    head = model.transformer_decoder.head.class_embed
    assert head is not old_head and head.out_features == 4 and model.num_classes == 3
    assert model.config.num_classes == 3 and model.id2label == new_labels
    assert torch.equal(head.weight[0], old_head.weight[0]) and torch.equal(head.weight[2], old_head.weight[4])
    assert torch.equal(head.weight[3], old_head.weight[8]) and not torch.equal(head.weight[1], old_head.weight[1])
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters() if n in kept)

    class Relabelled:  # synthetic scenes with 3 classes: circles, every other thing, and all stuff
        id2label, thing_ids = new_labels, frozenset({0, 1})
        base = SyntheticScenes(4, size=64, seed=2)

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            s = dict(self.base[i])
            s["labels"] = torch.tensor([0 if c == 0 else 1 if c < 4 else 2 for c in s["labels"].tolist()])
            return s

    data = OneFormerTrainingDataset(Relabelled(), tokenizer=tokenizer)
    result = train(model, data, config=TrainingConfig(max_steps=2, batch_size=2, num_points=100, log_every=1),
                   progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    model.save_pretrained(tmp_path / "ft")
    from maskformers.hub import from_pretrained

    loaded = from_pretrained(tmp_path / "ft")
    assert loaded.num_classes == 3 and loaded.id2label == new_labels
    x = torch.randn(1, 3, 64, 64)
    task = data.processor.task_inputs("panoptic", 1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, task).class_logits, model(x, task).class_logits, rtol=0, atol=0)
