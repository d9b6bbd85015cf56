"""Synthetic scenes: seeded images of shapes (things) over textured regions (stuff), with exact masks.

Each scene has one to three stuff regions split by wavy borders ("sky", "grass", "water", "sand") and a
few things ("circle", "square", "triangle", "star") of random size, rotation and colour shade, drawn
in random order so that they overlap; a thing hidden below ``min_visible`` of its area is left out of
the scene. Every class has its own colour family and texture, so a small model can learn the task
in minutes, while overlaps, thin visible slivers, borders and noise keep it from being trivial.

Scene ``i`` of ``SyntheticScenes(seed=s)`` depends only on ``(s, i)``: datasets can be sharded,
shuffled and resumed freely. Samples use the common format of :mod:`maskformers.training.data`
(image + per-segment masks, labels, crowd flags), so they give targets for all three tasks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SyntheticScenes", "SYNTHETIC_CLASSES", "SYNTHETIC_THING_IDS"]

SYNTHETIC_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "sky", "grass", "water", "sand")
SYNTHETIC_THING_IDS: frozenset[int] = frozenset({0, 1, 2, 3})
# base colour (RGB, 0..1) of every class; things get a shade of it, stuff a texture around it
_COLOURS = torch.tensor([
    [0.85, 0.15, 0.15],  # circle: red
    [0.95, 0.80, 0.10],  # square: yellow
    [0.60, 0.20, 0.80],  # triangle: purple
    [0.95, 0.50, 0.85],  # star: pink
    [0.45, 0.70, 0.95],  # sky: light blue
    [0.25, 0.60, 0.20],  # grass: green
    [0.10, 0.25, 0.60],  # water: dark blue
    [0.85, 0.75, 0.55],  # sand: beige
])


class SyntheticScenes:
    """A map-style dataset of ``num_samples`` scenes of ``size`` (H, W).

    ``scenes[i]`` -> ``{"image": (3, H, W) uint8, "masks": (N, H, W) bool, "labels": (N,) int64,
    "iscrowd": (N,) bool, "source": "synthetic:{seed}:{i}"}``; ``id2label`` and ``thing_ids`` describe
    the classes (4 things, then 4 stuff).
    """

    id2label = dict(enumerate(SYNTHETIC_CLASSES))
    thing_ids = SYNTHETIC_THING_IDS

    def __init__(
        self,
        num_samples: int,
        *,
        size: tuple[int, int] | int = 128,
        seed: int = 0,
        things: tuple[int, int] = (1, 6),
        min_visible: float = 0.4,
        noise: float = 0.04,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 16:
            raise ValueError(f"size must be at least 16x16, got {self.size}")
        if not 0 <= things[0] <= things[1]:
            raise ValueError(f"things must be a (min, max) count range, got {things}")
        self.num_samples, self.seed, self.things = num_samples, seed, things
        self.min_visible, self.noise = min_visible, noise

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"scene index {index} out of range for {self.num_samples} scenes")
        index %= self.num_samples
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        H, W = self.size
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5,
                                indexing="ij")
        image = torch.zeros(3, H, W)
        masks, labels = [], []
        for cls, region in self._stuff(g, xx, yy):
            image = torch.where(region, self._texture(g, cls, xx, yy), image)
            masks.append(region)
            labels.append(cls)
        things = self._things(g, xx, yy)
        for k, (cls, shape, shade) in enumerate(things):
            visible = shape.clone()
            for _, later, _ in things[k + 1:]:
                visible &= ~later
            image = torch.where(shape, shade[:, None, None].expand(3, H, W), image)
            for i in range(len(masks)):
                masks[i] = masks[i] & ~shape
            masks.append(visible)
            labels.append(cls)
        image = image + self.noise * torch.randn(3, H, W, generator=g)
        keep = [i for i, m in enumerate(masks) if m.any()]
        return {
            "image": (image.clamp(0, 1) * 255).round().to(torch.uint8),
            "masks": torch.stack([masks[i] for i in keep]) if keep else torch.zeros(0, H, W, dtype=torch.bool),
            "labels": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
            "iscrowd": torch.zeros(len(keep), dtype=torch.bool),
            "source": f"synthetic:{self.seed}:{index}",
        }

    # ------------------------------------------------------------------ scene parts
    @staticmethod
    def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def _stuff(self, g: torch.Generator, xx: torch.Tensor, yy: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """1-3 stuff classes in horizontal bands with wavy borders, top to bottom."""
        H, W = xx.shape
        n = int(torch.randint(1, 4, (), generator=g))
        classes = (torch.randperm(4, generator=g)[:n] + 4).tolist()
        cuts = sorted(self._uniform(g, 0.2, 0.8) * H for _ in range(n - 1))
        level = torch.zeros_like(xx, dtype=torch.int64)
        for cut in cuts:
            amp, freq, phase = self._uniform(g, 0, 0.08 * H), self._uniform(g, 1, 4), self._uniform(g, 0, 2 * math.pi)
            border = cut + amp * torch.sin(xx / W * freq * 2 * math.pi + phase)
            level += (yy > border).long()
        return [(c, level == i) for i, c in enumerate(classes)]

    def _texture(self, g: torch.Generator, cls: int, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        H, W = xx.shape
        base = _COLOURS[cls] + 0.06 * (torch.rand(3, generator=g) - 0.5)
        if cls == 4:  # sky: vertical gradient
            pattern = 0.15 * (yy / H - 0.5)
        elif cls == 5:  # grass: blotchy noise
            coarse = torch.rand(1, 1, H // 8 + 1, W // 8 + 1, generator=g)
            pattern = 0.2 * (torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear")[0, 0] - 0.5)
        elif cls == 6:  # water: horizontal ripples
            pattern = 0.08 * torch.sin(yy * self._uniform(g, 0.4, 0.8) + 0.5 * torch.sin(xx * 0.15))
        else:  # sand: fine grain
            pattern = 0.08 * (torch.rand(H, W, generator=g) - 0.5)
        return base[:, None, None] + pattern[None]

    def _things(self, g: torch.Generator, xx: torch.Tensor, yy: torch.Tensor):
        """[(class, mask (H, W) bool, colour (3,))] in drawing order, each visible enough."""
        H, W = xx.shape
        n = int(torch.randint(self.things[0], self.things[1] + 1, (), generator=g))
        drawn = []
        for _ in range(n):
            cls = int(torch.randint(0, 4, (), generator=g))
            r = self._uniform(g, 0.07, 0.2) * min(H, W)
            cx, cy = self._uniform(g, 0.05, 0.95) * W, self._uniform(g, 0.05, 0.95) * H
            angle = self._uniform(g, 0, 2 * math.pi)
            shade = (_COLOURS[cls] * self._uniform(g, 0.75, 1.1) + 0.08 * (torch.rand(3, generator=g) - 0.5))
            u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
            v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
            if cls == 0:
                mask = u**2 + v**2 <= r**2
            elif cls == 1:
                mask = (u.abs() <= 0.8 * r) & (v.abs() <= 0.8 * r)
            elif cls == 2:
                mask = torch.ones_like(u, dtype=torch.bool)
                for k in range(3):
                    a = 2 * math.pi * k / 3
                    mask &= u * math.cos(a) + v * math.sin(a) <= 0.45 * r
            else:  # five-pointed star: radius modulated by the polar angle
                rho, theta = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
                mask = rho <= r * (0.55 + 0.45 * torch.cos(5 * theta).clamp(min=0) ** 2)
            if int(mask.sum()) >= 16:
                drawn.append((cls, mask, shade.clamp(0, 1)))
        kept = []
        for k, (cls, mask, shade) in enumerate(drawn):  # drop things mostly hidden by later ones
            visible = mask.clone()
            for _, later, _ in drawn[k + 1:]:
                visible &= ~later
            if int(visible.sum()) >= self.min_visible * int(mask.sum()):
                kept.append((cls, mask, shade))
        return kept
