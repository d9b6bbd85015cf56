"""Post-processing of a batch on the device: the host waits a fixed number of times per call (not once or
more per image), and a batch gives each image exactly what that image gives alone.

No GPU runs here: ``HostSyncCounter`` counts, on the CPU, every operation that would make the host wait for
a GPU (value reads, value-dependent output sizes, host/device copies)."""

from __future__ import annotations

import pytest
import torch
from host_sync_helpers import HostSyncCounter

from maskformers.processing import post_process_instance, post_process_panoptic, post_process_semantic

INPUT = (96, 128)


def _outputs(batch: int, seed: int = 0, queries: int = 20, classes: int = 6):
    """Confident rectangles and peaked class logits (segments survive every rule); image 1 keeps nothing."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(batch, queries, 24, 32, generator=g) - 6
    for b in range(batch):
        for q in range(queries):
            y0, x0 = torch.randint(0, 16, (2,), generator=g).tolist()
            dy, dx = torch.randint(4, 12, (2,), generator=g).tolist()
            masks[b, q, y0 : y0 + dy, x0 : x0 + dx] += 12
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    class_logits.scatter_(2, torch.randint(0, classes + 1, (batch, queries, 1), generator=g), 6.0)
    if batch > 1:
        class_logits[1] = -10.0
        class_logits[1, :, -1] = 10.0  # all "no object"
    return class_logits, masks


def _geometry(batch: int) -> dict:
    images = [(96, 128), (80, 100), (50, 128), (96, 70)][:batch]
    targets = [(96, 128), (160, 200), (37, 41), (120, 90)][:batch]
    return dict(input_size=INPUT, image_sizes=images, target_sizes=targets)


CASES = {
    "semantic": (post_process_semantic, {}),
    "semantic-scores": (post_process_semantic, {"return_scores": True}),
    "panoptic": (post_process_panoptic, {"threshold": 0.3}),
    "panoptic-fused": (post_process_panoptic, {"threshold": 0.3, "label_ids_to_fuse": [1, 3]}),
    "instance": (post_process_instance, {"threshold": 0.3, "return_masks": True}),
    "instance-things": (post_process_instance, {"threshold": 0.3, "thing_ids": [0, 2, 5]}),
}
# the most waits a call may make: semantic none; the others one for the kept counts, one for the segment lists
MOST_WAITS = {"semantic": 0, "semantic-scores": 0}


@pytest.mark.parametrize("model", ["mask2former", "oneformer"])
@pytest.mark.parametrize("case", list(CASES))
def test_host_waits_do_not_grow_with_the_batch(case, model):
    fn, kwargs = CASES[case]
    waits = []
    for batch in (1, 4):
        class_logits, mask_logits = _outputs(batch)
        with HostSyncCounter() as counter:
            fn(class_logits, mask_logits, model=model, **_geometry(batch), **kwargs)
        waits.append(dict(counter.events))
    assert waits[0] == waits[1], f"batch 1: {waits[0]}, batch 4: {waits[1]}"
    assert sum(waits[1].values()) <= MOST_WAITS.get(case, 2), waits[1]


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where


@pytest.mark.parametrize("model", ["mask2former", "oneformer"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_image_of_a_batch_gets_what_it_gets_alone(case, model):
    fn, kwargs = CASES[case]
    class_logits, mask_logits = _outputs(4, seed=1)
    geometry = _geometry(4)
    batched = fn(class_logits, mask_logits, model=model, **geometry, **kwargs)
    for i in range(4):
        alone = fn(class_logits[i : i + 1], mask_logits[i : i + 1], model=model, input_size=INPUT,
                   image_sizes=geometry["image_sizes"][i : i + 1], target_sizes=geometry["target_sizes"][i : i + 1],
                   **kwargs)
        _same(batched[i], alone[0], f"image {i}")
    if case.startswith(("panoptic", "instance")):
        assert batched[1]["segments_info"] == [] and batched[0]["segments_info"] and batched[3]["segments_info"]
