"""Loop-by-loop float64 stand-ins for NATTEN's legacy 2-D functions, independent of maskformers.ops, and a
working ``forward`` for transformers 5's DiNAT ``NeighborhoodAttention`` (see test_dinat.py).

``natten2dqkrpb`` / ``natten2dav`` take NATTEN's layout (B, heads, H, W, D) and attention (B, heads, H, W,
K*K). The window and bias-table starts follow the branch-by-branch description of NATTEN 0.14-0.17
(left border, right border with the per-group remainder, interior), a different formulation from the
clamp used by maskformers.ops, so the two check each other. Slow: for tests on small maps only.
"""

from __future__ import annotations

import torch

__all__ = ["attention_forward_v4_layout", "natten2dav", "natten2dqkrpb", "natten_bias_start", "natten_window_start"]


def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    half = kernel_size // 2
    group = index % dilation
    if index - half * dilation < 0:  # left border: the group's first member
        return group
    if index + half * dilation >= length:  # right border: the group's last kernel_size members
        full = (length // dilation) * dilation
        remainder = length - full  # the first `remainder` groups have one member more
        if group < remainder:
            return length - remainder + group - 2 * half * dilation
        return full + group - kernel_size * dilation
    return index - half * dilation


def natten_bias_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    half = kernel_size // 2
    if dilation <= 1:
        start = half
        if index < half:
            start += half - index
        if index + half >= length:
            start += length - index - 1 - half
        return start
    if index - half * dilation < 0:
        return kernel_size - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def _neighbours(i: int, j: int, H: int, W: int, K: int, d: int):
    si, sj = natten_window_start(i, H, K, d), natten_window_start(j, W, K, d)
    for ki in range(K):
        for kj in range(K):
            yield ki * K + kj, si + ki * d, sj + kj * d, ki, kj


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    """(B, heads, H, W, D) x2, rpb (heads, 2K-1, 2K-1) or None -> logits (B, heads, H, W, K*K), float64."""
    B, heads, H, W, _ = query.shape
    K = kernel_size
    q, k = query.double(), key.double()
    out = torch.empty(B, heads, H, W, K * K, dtype=torch.float64, device=query.device)
    for i in range(H):
        pi = natten_bias_start(i, H, K, dilation)
        for j in range(W):
            pj = natten_bias_start(j, W, K, dilation)
            for n, r, c, ki, kj in _neighbours(i, j, H, W, K, dilation):
                logit = (q[:, :, i, j] * k[:, :, r, c]).sum(-1)  # (B, heads)
                if rpb is not None:
                    logit = logit + rpb.double()[:, pi + ki, pj + kj]
                out[:, :, i, j, n] = logit
    return out.to(query.dtype)


def natten2dav(attn, value, kernel_size, dilation):
    """attn (B, heads, H, W, K*K), value (B, heads, H, W, D) -> (B, heads, H, W, D), float64 sums."""
    B, heads, H, W, D = value.shape
    a, v = attn.double(), value.double()
    out = torch.zeros(B, heads, H, W, D, dtype=torch.float64, device=value.device)
    for i in range(H):
        for j in range(W):
            for n, r, c, _, _ in _neighbours(i, j, H, W, kernel_size, dilation):
                out[:, :, i, j] += a[:, :, i, j, n, None] * v[:, :, r, c]
    return out.to(value.dtype)


def _modeling_dinat():
    import transformers.models.dinat.modeling_dinat as modeling_dinat

    return modeling_dinat


def attention_forward_v4_layout(self, hidden_states, output_attentions=False):
    """transformers' NeighborhoodAttention.forward with the (B, heads, H, W, D) layout NATTEN expects."""
    batch, height, width, _ = hidden_states.shape

    def heads_first(x):  # (B, H, W, C) -> (B, heads, H, W, D)
        return x.view(batch, height, width, self.num_attention_heads, self.attention_head_size).permute(0, 3, 1, 2, 4)

    query = heads_first(self.query(hidden_states)) / self.attention_head_size**0.5
    natten = _modeling_dinat()  # its natten2dqkrpb / natten2dav, whatever a test has put there
    key = heads_first(self.key(hidden_states))
    scores = natten.natten2dqkrpb(query, key, self.rpb, self.kernel_size, self.dilation)
    probs = self.dropout(scores.softmax(dim=-1))
    context = natten.natten2dav(probs, heads_first(self.value(hidden_states)), self.kernel_size, self.dilation)
    context = context.permute(0, 2, 3, 1, 4).reshape(batch, height, width, self.all_head_size)
    return (context, probs) if output_attentions else (context,)
