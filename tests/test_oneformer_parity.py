"""End-to-end parity of OneFormer with transformers: random transformers ``OneFormerForUniversalSegmentation``
models (every parameter perturbed), ``save_pretrained``, our ``from_pretrained``, the same inputs; every
prediction (final and auxiliary), the task token, the contrastive queries and (training mode) the text
queries compared for each of the three tasks."""

from __future__ import annotations

import copy

import pytest
import torch

from mask2former_helpers import F64, assert_float32_noise, assert_predictions_close, no_native_toolchain, perturb_
from mask2former_helpers import swin_config

import maskformers
from maskformers.models.oneformer import OneFormer

transformers = pytest.importorskip("transformers")
from transformers import OneFormerConfig as HFOneFormerConfig  # noqa: E402
from transformers import OneFormerForUniversalSegmentation  # noqa: E402

# "the task is {task}" as CLIP ids: start, "the", "task", "is", task word, end, then 0-padding to 77
_TASK_WORDS = {"semantic": 13089, "instance": 6529, "panoptic": 26765}


def task_inputs(task: str, batch: int = 2) -> torch.Tensor:
    ids = torch.zeros(batch, 77, dtype=torch.int64)
    ids[:, :6] = torch.tensor([49406, 518, 2246, 533, _TASK_WORDS[task], 49407])
    return ids


def text_inputs(batch: int, num_text: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random prompts of random lengths: start token, words, end token (the row's largest id), zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, num_text, 77, dtype=torch.int64)
    for b in range(batch):
        for t in range(num_text):
            n = int(torch.randint(1, 9, (1,), generator=g))
            ids[b, t, 0] = vocab - 2
            ids[b, t, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
            ids[b, t, n + 1] = vocab - 1
    return ids


def tiny_hf_config(*, is_training=False, window_size=7, pre_norm=False, num_queries=10, dropout=0.1, **kw):
    return HFOneFormerConfig(
        backbone_config=swin_config(window_size=window_size), hidden_dim=64, conv_dim=64, mask_dim=64,
        num_attention_heads=4, encoder_feedforward_dim=32, dim_feedforward=48, num_queries=num_queries,
        num_labels=4, decoder_layers=4, encoder_layers=2, query_dec_layers=2, pre_norm=pre_norm,
        is_training=is_training, dropout=dropout, text_encoder_width=64, text_encoder_num_layers=2,
        text_encoder_vocab_size=99, text_encoder_n_ctx=4, text_encoder_proj_layers=2, **kw,
    )


def make_pair(tmp_path, config, seed=0, backend="reference"):
    torch.manual_seed(seed)
    hf = perturb_(OneFormerForUniversalSegmentation(config), seed=seed).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    ours = maskformers.from_pretrained(tmp_path / "ckpt", op_backend=backend)
    assert isinstance(ours, OneFormer)
    return hf, ours


def hf_outputs(hf, x, task, text=None):
    with torch.no_grad():
        out = hf(pixel_values=x, task_inputs=task, text_inputs=text, output_auxiliary_logits=True)
    preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_predictions]
    preds.append((out.class_queries_logits, out.masks_queries_logits))
    return preds, out


def our_outputs(ours, x, task, text=None):
    with torch.no_grad():
        out = ours(x, task, text_inputs=text)
    preds = [(a["class_logits"], a["mask_logits"]) for a in out.aux_outputs]
    preds.append((out.class_logits, out.mask_logits))
    return preds, out


def check(hf, ours, x, *, text=None, float32=True):
    for task in ("semantic", "instance", "panoptic"):
        t = task_inputs(task, x.shape[0])
        expected, ref = hf_outputs(hf.double(), x.double(), t, text)
        got, out = our_outputs(ours.double(), x.double(), t, text)
        assert len(got) == len(expected) == ours.config.decoder_layers + 1
        assert_predictions_close(expected, got, **F64)
        torch.testing.assert_close(out.task_token, ref.task_token, **F64)
        torch.testing.assert_close(out.contrastive_queries, ref.transformer_decoder_contrastive_queries, **F64)
        if text is not None:
            torch.testing.assert_close(out.text_queries, ref.text_queries, **F64)
        assert 0.05 < (out.mask_logits < 0).double().mean() < 0.95  # masks that mask
        if float32:
            expected, _ = hf_outputs(hf.float(), x.float(), t, text)
            got, _ = our_outputs(ours.float(), x.float(), t, text)
            assert_float32_noise(expected, got)
    # the task changes the predictions (the conditioning is wired in)
    a, _ = our_outputs(ours.double(), x.double(), task_inputs("semantic", x.shape[0]), None)
    b, _ = our_outputs(ours.double(), x.double(), task_inputs("panoptic", x.shape[0]), None)
    assert (a[-1][0] - b[-1][0]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_tiny_inference(tmp_path, size):
    hf, ours = make_pair(tmp_path, tiny_hf_config())
    assert ours.text_mapper is None
    check(hf, ours, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)))


def test_tiny_window12_pre_norm_no_task_norm(tmp_path):
    hf, ours = make_pair(tmp_path, tiny_hf_config(window_size=12, pre_norm=True, use_task_norm=False), seed=1)
    assert not ours.use_task_norm
    check(hf, ours, torch.randn(2, 3, 389, 261, generator=torch.Generator().manual_seed(1)), float32=False)


def test_tiny_training_mode_text_queries_transformers_attention(tmp_path):
    """is_training checkpoints carry the text mapper. transformers attends bidirectionally in the text encoder
    (it never applies its causal mask): our flag for that mode must match it exactly. Dropout off (transformers
    applies the pixel decoder's dropout whenever is_training, even in eval mode)."""
    hf, ours = make_pair(tmp_path, tiny_hf_config(is_training=True, dropout=0.0), seed=2)
    assert ours.text_mapper is not None and ours.text_mapper.text_encoder.causal  # the original's default
    ours.text_mapper.text_encoder.causal = False  # transformers' behaviour
    text = text_inputs(2, ours.num_queries - 4, vocab=99)
    check(hf, ours, torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(2)), text=text)


def test_text_encoder_causal_by_default_like_the_original(tmp_path):
    """Default (the original OneFormer): causal text attention. Checked against transformers' own text layers
    made to apply the causal mask they build."""
    hf, ours = make_pair(tmp_path, tiny_hf_config(is_training=True, dropout=0.0), seed=3)
    text = text_inputs(2, ours.num_queries - 4, vocab=99, seed=3)
    hf_mapper = copy.deepcopy(hf.model.text_mapper).double()
    for layer in hf_mapper.text_encoder.transformer.layers:
        layer.self_attn = _WithMask(layer.self_attn, layer.attn_mask.double())
    with torch.no_grad():
        expected = hf_mapper(text)
        got = ours.text_mapper.double()(text)
        bidirectional = hf.model.text_mapper.double()(text)
    torch.testing.assert_close(got, expected, **F64)
    assert (got - bidirectional).abs().max() > 1e-3  # the two modes really differ


class _WithMask(torch.nn.Module):
    """An nn.MultiheadAttention that applies the additive mask transformers stores but never passes."""

    def __init__(self, attn, mask):
        super().__init__()
        self.attn, self.mask = attn, mask

    def forward(self, q, k, v, **kwargs):
        return self.attn(q, k, v, attn_mask=self.mask, **kwargs)


@pytest.fixture(scope="module")
def swin_tiny_ade_checkpoint(tmp_path_factory):
    backbone = swin_config(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    config = HFOneFormerConfig(backbone_config=backbone, num_labels=150, num_queries=150)
    torch.manual_seed(4)
    hf = perturb_(OneFormerForUniversalSegmentation(config), seed=4, scale=0.02).eval()
    folder = tmp_path_factory.mktemp("oneformer_swin_tiny")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_swin_tiny_ade20k_architecture(swin_tiny_ade_checkpoint, backend):
    """The full published shi-labs/oneformer_ade20k_swin_tiny architecture (150 classes, 150 queries, 6 + 9
    layers, 2 query-transformer layers), batch 2, a size that is not a multiple of 32."""
    if backend == "native" and no_native_toolchain():
        pytest.skip(no_native_toolchain())
    hf, folder = swin_tiny_ade_checkpoint
    ours = maskformers.from_pretrained(folder, op_backend=backend)
    assert ours.num_classes == 150 and ours.num_queries == 150 and ours.config.decoder_layers == 9
    x = torch.randn(2, 3, 100, 140, generator=torch.Generator().manual_seed(4))
    t = task_inputs("panoptic")
    expected, ref = hf_outputs(hf.double(), x.double(), t)
    got, out = our_outputs(ours.double(), x.double(), t)
    assert_predictions_close(expected, got, **F64)
    torch.testing.assert_close(out.contrastive_queries, ref.transformer_decoder_contrastive_queries, **F64)
    expected, _ = hf_outputs(hf.float(), x.float(), t)
    got, _ = our_outputs(ours.float(), x.float(), t)
    assert_float32_noise(expected, got)
