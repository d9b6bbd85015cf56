"""One training step, maskformers vs transformers: forward, matching, losses, backward, AdamW step.

Both libraries get the same weights (a random-init transformers Swin-T COCO-panoptic Mask2Former, loaded
into ours through the checkpoint converter), the same batch (2 synthetic 384x384 scenes with their
panoptic targets) and the same loss settings (12544 points, weights 2/5/5, auxiliary losses); the step
is timed in float32 and under bfloat16 autocast, median over repeats, and peak memory is measured in a
child process per library (resident set on CPU, max allocated on CUDA). A second table times the
Hungarian matcher per image at 100 queries x 50 targets (96x96 mask logits, 384x384 targets).

    python benchmarks/train_step.py            # full run, writes benchmarks/results/train_step.json
    python benchmarks/train_step.py --quick    # tiny model, small images, a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402

LIBRARIES = ("transformers", "maskformers")


def hf_config(quick: bool):
    from transformers import Mask2FormerConfig, SwinConfig

    if quick:
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                              out_features=["stage1", "stage2", "stage3", "stage4"])
        return Mask2FormerConfig(backbone_config=backbone, hidden_dim=64, feature_size=64, mask_feature_size=64,
                                 num_attention_heads=4, encoder_feedforward_dim=64, dim_feedforward=128,
                                 num_queries=20, num_labels=8, decoder_layers=4, encoder_layers=2,
                                 train_num_points=2048)
    backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, num_labels=8, num_queries=100)


def write_checkpoint(folder: Path, quick: bool) -> None:
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(hf_config(quick)).save_pretrained(folder)


def make_batch(image: int, batch: int):
    from maskformers.training.data import TrainingDataset, collate
    from maskformers.training.synthetic import SyntheticScenes

    data = TrainingDataset(SyntheticScenes(batch, size=image, seed=3), task="panoptic")
    return collate([data[i] for i in range(batch)])


class Step:
    """A ready-to-run training step of one library (model, optimizer, loss)."""

    def __init__(self, library: str, folder: Path, device: torch.device, quick: bool) -> None:
        self.library, self.device = library, device
        if library == "transformers":
            from transformers import Mask2FormerForUniversalSegmentation

            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(folder).to(device).train()
        else:
            from maskformers import Mask2Former
            from maskformers.training.config import TrainingConfig
            from maskformers.training.loop import build_criterion

            self.model = Mask2Former.from_pretrained(folder).to(device).train()
            cfg = hf_config(quick)
            self.criterion = build_criterion(TrainingConfig(num_points=cfg.train_num_points), self.model.num_classes)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.05)

    def __call__(self, batch, amp: bool) -> float:
        x = batch["pixel_values"].to(self.device)
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in batch["targets"]]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            if self.library == "transformers":
                out = self.model(x, mask_labels=[t["masks"].float() for t in targets],
                                 class_labels=[t["labels"] for t in targets])
                loss = out.loss
            else:
                out = self.model(x)
        if self.library == "maskformers":
            loss = self.criterion.total(self.criterion(out, targets))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())


def peak_in_this_process(library: str, folder: str, image: int, batch: int, amp: bool, device: str,
                         quick: bool) -> float:
    dev = torch.device(device)
    step = Step(library, Path(folder), dev, quick)
    data = make_batch(image, batch)
    step(data, amp)  # warm-up: optimizer state, kernels
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(data, amp)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as peak:
        step(data, amp)
    return peak.mb


def peak_child(library, folder, image, batch, amp, device, quick) -> float:
    code = ("import sys; sys.path.insert(0, %r); import train_step as t; print(t.peak_in_this_process(%r, %r, %d, %d, "
            "%r, %r, %r))" % (str(Path(__file__).parent), library, str(folder), image, batch, amp, device, quick))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {library}:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def time_matcher(repeats: int, device: torch.device, queries: int = 100, targets: int = 50, images: int = 4):
    """Median seconds per image of each library's matcher on the same inputs."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher

    from maskformers.training.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    cls = torch.randn(images, queries, 134, generator=g).to(device)
    masks = torch.randn(images, queries, 96, 96, generator=g).to(device)
    tgts = [{"labels": torch.randint(0, 133, (targets,), generator=g).to(device),
             "masks": (torch.rand(targets, 384, 384, generator=g) > 0.7).to(device)} for _ in range(images)]
    ours, theirs = HungarianMatcher(), Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    hf_masks, hf_labels = [t["masks"].float() for t in tgts], [t["labels"] for t in tgts]
    float_tgts = [{"labels": t["labels"], "masks": m} for t, m in zip(tgts, hf_masks)]  # the same float32 masks
    runs = {"maskformers": lambda: ours(cls, masks, float_tgts),
            "transformers": lambda: theirs(masks, cls, hf_masks, hf_labels)}
    out = {}
    for name, fn in runs.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) / images
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 128x128, 2 repeats: a smoke run")
    parser.add_argument("--image", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="fp32, and bf16 autocast (emulated, so slow, on CPUs without AVX-512 BF16 or AMX)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    image = args.image or (128 if args.quick else 384)
    repeats = args.repeats or (2 if args.quick else 5)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.quick)
        data = make_batch(image, args.batch)
        for amp in [precision == "bf16" for precision in args.precisions]:
            steps = {lib: Step(lib, folder, device, args.quick) for lib in LIBRARIES}
            times = {lib: [] for lib in LIBRARIES}
            losses = {lib: steps[lib](data, amp) for lib in LIBRARIES}  # warm-up; first losses agree in law only
            for _ in range(repeats):
                for lib in LIBRARIES:
                    t0 = time.perf_counter()
                    steps[lib](data, amp)
                    times[lib].append(time.perf_counter() - t0)
            ms = {lib: statistics.median(t) * 1e3 for lib, t in times.items()}
            row = {"image": image, "batch": args.batch, "amp": "bf16" if amp else "fp32",
                   "transformers_ms": ms["transformers"], "maskformers_ms": ms["maskformers"],
                   "speedup": ms["transformers"] / ms["maskformers"],
                   "first_loss_transformers": losses["transformers"], "first_loss_maskformers": losses["maskformers"]}
            if not args.no_memory:
                for lib in LIBRARIES:
                    row[f"{lib}_peak_mb"] = peak_child(lib, folder, image, args.batch, amp, args.device, args.quick)
            rows.append(row)
            del steps
    matcher = time_matcher(repeats=3 if args.quick else 10, device=device)

    print("| step | transformers ms | maskformers ms | speedup | transformers peak MB | maskformers peak MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = (f"{r['transformers_peak_mb']:.0f} | {r['maskformers_peak_mb']:.0f}" if not args.no_memory else "- | -")
        print(f"| {r['image']}x{r['image']} batch {r['batch']} {r['amp']} | {r['transformers_ms']:.0f} | "
              f"{r['maskformers_ms']:.0f} | {r['speedup']:.2f}x | {mem} |")
    print(f"\nmatcher, 100 queries x 50 targets, per image: transformers {matcher['transformers'] * 1e3:.1f} ms, "
          f"maskformers {matcher['maskformers'] * 1e3:.1f} ms "
          f"({matcher['transformers'] / matcher['maskformers']:.2f}x)")
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "cpu_model": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(), "repeats": repeats,
            "quick": args.quick, "config": "tiny test model" if args.quick else "swin-tiny Mask2Former, 100 queries"}
    out = args.out or Path(__file__).parent / "results" / f"train_step{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "matcher_s_per_image": matcher}, indent=2))
    print(f"\n{meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
          f"{meta['transformers']}; median of {repeats}. JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
