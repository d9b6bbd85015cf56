"""The training loop: optimizer groups and schedule, data order, checkpoints (atomic, fallback), a run
killed with SIGKILL and resumed gives bit-identical losses, 2 processes under torchrun match 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from maskformers.training import checkpoint as ckpt
from maskformers.training.config import TrainingConfig
from maskformers.training.loop import batch_indices
from maskformers.training.optim import build_optimizer, poly_schedule

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "backbone": {"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    "num_classes": 8, "num_queries": 6, "hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "num_heads": 2,
    "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 2, "decoder_ffn_dim": 32,
}

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former
    from maskformers.training.config import TrainingConfig
    from maskformers.training.data import TrainingDataset
    from maskformers.training.loop import train
    from maskformers.training.synthetic import SyntheticScenes
    from maskformers.training.transforms import lsj_augmentation
    out, resume, model_cfg, train_cfg, delay = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3]), \\
        json.loads(sys.argv[4]), float(sys.argv[5])
    torch.manual_seed(0)
    model = build_mask2former(Mask2FormerConfig.from_dict(model_cfg))
    reader = base = SyntheticScenes(24, size=64, seed=1)
    if delay:  # slow the run down so the test can kill it between checkpoints
        import time

        class Slow:
            id2label, thing_ids = base.id2label, base.thing_ids
            def __len__(self):
                return len(base)
            def __getitem__(self, i):
                time.sleep(delay)
                return base[i]
        reader = Slow()
    data = TrainingDataset(reader, task="panoptic", transform=lsj_augmentation(64, scale_range=(0.6, 1.4), seed=2))
    result = train(model, data, config=TrainingConfig(**train_cfg), output_dir=out, resume=resume, progress=False)
    if result.step == train_cfg["max_steps"]:
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out + "/final_params.pt")
""")

TRAIN = {"max_steps": 8, "batch_size": 2, "num_points": 200, "log_every": 1, "checkpoint_every": 2,
         "keep_checkpoints": 3, "lr": 1e-3}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(tmp_path, out, *, resume=False, train=TRAIN, delay=0.0, wait=True):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), str(out), "1" if resume else "0", json.dumps(TINY), json.dumps(train),
            str(delay)]
    if not wait:
        return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _losses(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("images_per_s",)} for r in records if "loss" in r}


def test_parameter_groups_and_poly_schedule():
    from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former

    model = build_mask2former(Mask2FormerConfig.from_dict(TINY))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_lr_multiplier=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "backbone/no_decay", "heads", "heads/no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, g in groups.items():
        assert g["lr"] == pytest.approx(1e-4 if name.startswith("backbone") else 1e-3)
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.05)
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "query_feat.weight" in no_decay and "transformer_decoder.level_embed.weight" in no_decay
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "backbone.norms.0.weight" in no_decay and "pixel_decoder.input_projs.0.1.bias" in no_decay
    assert "transformer_decoder.head.class_embed.weight" not in no_decay
    assert "transformer_decoder.head.class_embed.bias" not in no_decay  # biases decay, as in detectron2
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert poly_schedule(0, max_steps=100) == 1.0
    assert poly_schedule(50, max_steps=100, power=0.9) == pytest.approx(0.5**0.9)
    assert poly_schedule(0, max_steps=100, warmup_steps=10, warmup_factor=0.1) == pytest.approx(0.1)
    assert poly_schedule(5, max_steps=100, warmup_steps=10, warmup_factor=0.1) == pytest.approx(0.55 * 0.95**0.9)
    assert poly_schedule(100, max_steps=100) == 0.0


def test_data_order_partitions_the_global_batch():
    cfg = TrainingConfig(batch_size=2, grad_accumulation=2)
    single = TrainingConfig(batch_size=8)
    for step in range(5):
        _, one = batch_indices(step, 0, num_samples=30, config=single)
        parts = [batch_indices(step, m, num_samples=30, config=TrainingConfig(batch_size=2, grad_accumulation=2),
                               rank=r, world_size=2)[1] for m in range(2) for r in range(2)]
        assert sorted(sum(parts, [])) == sorted(one) and len(set(one)) == 8
    epoch0 = sum((batch_indices(s, 0, num_samples=30, config=single)[1] for s in range(3)), [])
    assert len(set(epoch0)) == 24  # no repeats within an epoch (30 // 8 = 3 steps)
    assert batch_indices(3, 0, num_samples=30, config=single)[0] == 1
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(0, 0, num_samples=3, config=cfg, world_size=1)


def test_atomic_checkpoints_and_fallback_on_a_corrupt_one(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state()}
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, dict(state, step=step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000004.pt", "checkpoint-00000006.pt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    loaded, path = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 6
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial write
    with pytest.warns(RuntimeWarning, match=r"checkpoint-00000006\.pt.*resuming from checkpoint-00000004\.pt"):
        loaded, path = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 4
    with pytest.raises(ValueError, match="lacks"):
        ckpt.save_checkpoint(tmp_path, {"step": 1})
    assert ckpt.load_latest(tmp_path / "nothing") is None


def test_sigkill_and_resume_gives_bit_identical_losses(tmp_path):
    reference = tmp_path / "reference"
    _run(tmp_path, reference)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, 9))

    killed = tmp_path / "killed"
    proc = _run(tmp_path, killed, delay=0.15, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint-00000004.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    time.sleep(0.3)  # let it run a little past the checkpoint: those steps must be redone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_params.pt").exists()
    _run(tmp_path, killed, resume=True)
    got = _losses(killed)
    assert got == expected  # every step's losses, lr and grad norm, to the last bit
    ref_params, params = torch.load(reference / "final_params.pt"), torch.load(killed / "final_params.pt")
    assert all(torch.equal(ref_params[k], params[k]) for k in ref_params)


def test_resume_falls_back_from_a_corrupt_last_checkpoint(tmp_path):
    reference = tmp_path / "reference"
    _run(tmp_path, reference, train=dict(TRAIN, max_steps=6))
    run = tmp_path / "run"
    _run(tmp_path, run, train=dict(TRAIN, max_steps=6))
    last = run / "checkpoint-00000006.pt"
    last.write_bytes(last.read_bytes()[:1000])
    (run / "final_params.pt").unlink()
    done = _run(tmp_path, run, resume=True, train=dict(TRAIN, max_steps=6))
    assert "resuming from checkpoint-00000004.pt" in done.stderr
    assert _losses(run) == _losses(reference)
    a, b = torch.load(reference / "final_params.pt"), torch.load(run / "final_params.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    steps = 3
    _run(tmp_path, one, train=dict(TRAIN, max_steps=steps, batch_size=4, checkpoint_every=steps))
    script = tmp_path / "run.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script),
           str(two), "0", json.dumps(TINY), json.dumps(dict(TRAIN, max_steps=steps, batch_size=2,
                                                            checkpoint_every=steps)), "0"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = torch.load(one / "final_params.pt"), torch.load(two / "final_params.pt")
    start = torch.load(one / "checkpoint-00000003.pt", weights_only=False)["model"]
    assert all(torch.equal(start[k], a[k]) for k in a)  # the last checkpoint holds the final state
    # same update up to float32 summation order (gloo's all-reduce adds in another order than one process)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = _losses(one), _losses(two)
    for s in range(1, steps + 1):
        assert lb[s]["loss"] == pytest.approx(la[s]["loss"], rel=1e-5)


def _tiny_setup(**train):
    from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former
    from maskformers.training.data import TrainingDataset
    from maskformers.training.synthetic import SyntheticScenes

    torch.manual_seed(0)
    model = build_mask2former(Mask2FormerConfig.from_dict(TINY))
    data = TrainingDataset(SyntheticScenes(8, size=64, seed=1), task="panoptic")
    return model, data, TrainingConfig(**{**TRAIN, "max_steps": 1, "log_every": 1, **train})


def test_gradient_accumulation_equals_the_larger_batch():
    from maskformers.training.loop import train

    big_model, data, big = _tiny_setup(batch_size=4)
    acc_model, _, acc = _tiny_setup(batch_size=2, grad_accumulation=2)
    r1 = train(big_model, data, config=big, progress=False)
    r2 = train(acc_model, data, config=acc, progress=False)
    assert r1.losses[0]["loss"] == pytest.approx(r2.losses[0]["loss"], rel=1e-5)
    for (name, a), b in zip(big_model.named_parameters(), acc_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_step_and_skipped_samples_are_counted():
    from maskformers.training.data import SampleError, TrainingDataset
    from maskformers.training.loop import train

    model, data, cfg = _tiny_setup(amp="bf16", max_steps=2, max_skip_rate=0.2)  # 1 of 8 samples is bad
    bad = batch_indices(0, 0, num_samples=len(data), config=cfg)[1][0]  # a sample of the first batch

    class Flaky:
        id2label, thing_ids = data.reader.id2label, data.reader.thing_ids

        def __len__(self):
            return len(data.reader)

        def __getitem__(self, i):
            if i == bad:
                raise SampleError("scene-3.png: unreadable image (test)")
            return data.reader[i]

    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, TrainingDataset(Flaky(), task="panoptic", on_error="skip"), config=cfg, progress=False)
    assert result.step == 2 and result.skipped == 1
    assert result.skipped_samples == {bad: "scene-3.png: unreadable image (test)"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(SampleError, match="scene-3.png"):
        train(model, TrainingDataset(Flaky(), task="panoptic"), config=cfg, progress=False)
