"""Similarity-weighted patch pooling (docs/spec.md, section 4, kernel 2; Eq. 5).

    r_q = t . p_q,  z_q = r_q [r_q >= sigma],  u = sum_q z_q p_q,  e = u / max(|u|, eps)

One program per image. The forward makes one pass over the image's patches
(relevance and pooled sum together); the backward one more pass (recomputing
the relevance), writing the patch gradients and summing the text's. Extra
memory: |u| per image.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 16
# The backward holds more per program (the text's gradient, the relevance): at
# 4 warps its float32 build spilled on sm_80; at 8 no build spills
# (bench/kernels.py --compile-only).
FORWARD_WARPS, BACKWARD_WARPS = 4, 8
EPS = 1e-12  # as F.normalize


@triton.jit
def _pool_forward(PATCHES, TEXT, E, NORM, P, D, sigma,
                  BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    t = tl.load(TEXT + b * D + d, mask=d < D, other=0.0).to(tl.float32)
    u = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_P):
        q = start + tl.arange(0, BLOCK_P)
        p = tl.load(PATCHES + b * P * D + q[:, None] * D + d[None, :],
                    mask=(q[:, None] < P) & (d[None, :] < D), other=0.0).to(tl.float32)
        r = tl.sum(p * t[None, :], 1)
        z = tl.where((r >= sigma) & (q < P), r, 0.0)
        u += tl.sum(z[:, None] * p, 0)
    norm = tl.sqrt(tl.sum(u * u, 0))
    tl.store(E + b * D + d, u / tl.maximum(norm, 1e-12), mask=d < D)
    tl.store(NORM + b, norm)


@triton.jit
def _pool_backward(PATCHES, TEXT, E, NORM, DE, DP, DT, P, D, sigma,
                   BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    t = tl.load(TEXT + b * D + d, mask=d < D, other=0.0).to(tl.float32)
    e = tl.load(E + b * D + d, mask=d < D, other=0.0)
    de = tl.load(DE + b * D + d, mask=d < D, other=0.0).to(tl.float32)
    norm = tl.load(NORM + b)
    # Through e = u / max(|u|, eps): the clamp passes no gradient to |u|.
    du = tl.where(norm > 1e-12, (de - e * tl.sum(e * de, 0)) / tl.maximum(norm, 1e-12), de / 1e-12)
    dt = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_P):
        q = start + tl.arange(0, BLOCK_P)
        inside = (q[:, None] < P) & (d[None, :] < D)
        p = tl.load(PATCHES + b * P * D + q[:, None] * D + d[None, :], mask=inside, other=0.0).to(tl.float32)
        r = tl.sum(p * t[None, :], 1)
        keep = (r >= sigma) & (q < P)
        z = tl.where(keep, r, 0.0)
        dr = tl.where(keep, tl.sum(p * du[None, :], 1), 0.0)
        dp = z[:, None] * du[None, :] + dr[:, None] * t[None, :]
        tl.store(DP + b * P * D + q[:, None] * D + d[None, :], dp.to(DP.dtype.element_ty), mask=inside)
        dt += tl.sum(dr[:, None] * p, 0)
    tl.store(DT + b * D + d, dt.to(DT.dtype.element_ty), mask=d < D)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def builds(dtype: torch.dtype, D: int) -> list[tuple]:
    """(kernel, argument types, constants, options) of each kernel as the launchers
    run it on `dtype` patches and texts of width D (see kernels/build.py)."""
    t = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    meta = {"BLOCK_P": BLOCK_P, "BLOCK_D": _block_d(D)}
    ints = {"P": "i32", "D": "i32", "sigma": "fp32"}
    return [
        (_pool_forward, {"PATCHES": t, "TEXT": t, "E": "*fp32", "NORM": "*fp32", **ints}, meta,
         {"num_warps": FORWARD_WARPS, "num_stages": 3}),
        (_pool_backward, {"PATCHES": t, "TEXT": t, "E": "*fp32", "NORM": "*fp32", "DE": "*fp32", "DP": t, "DT": t,
                          **ints}, meta, {"num_warps": BACKWARD_WARPS, "num_stages": 3}),
    ]


def pool_forward(patches, text, sigma: float, e=None, norm=None):
    B, P, D = patches.shape
    e = torch.empty(B, D, device=patches.device, dtype=torch.float32) if e is None else e
    norm = torch.empty(B, device=patches.device, dtype=torch.float32) if norm is None else norm
    if B == 0:  # a rank without samples: nothing to launch
        return e, norm
    _pool_forward[(B,)](patches, text, e, norm, P, D, float(sigma), BLOCK_P=BLOCK_P, BLOCK_D=_block_d(D),
                        num_warps=FORWARD_WARPS)
    return e, norm


def pool_backward(patches, text, sigma: float, e, norm, grad_e, d_patches=None, d_text=None):
    B, P, D = patches.shape
    d_patches = torch.empty_like(patches) if d_patches is None else d_patches
    d_text = torch.empty_like(text) if d_text is None else d_text
    if B == 0:
        return d_patches, d_text
    _pool_backward[(B,)](patches, text, e, norm, grad_e.contiguous(), d_patches, d_text, P, D, float(sigma),
                         BLOCK_P=BLOCK_P, BLOCK_D=_block_d(D), num_warps=BACKWARD_WARPS)
    return d_patches, d_text


class KnowledgePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patches, text, sigma):
        ctx.dtypes = (patches.dtype, text.dtype)
        if patches.dtype == torch.float64:  # the kernels compute in float32
            patches, text = patches.float(), text.float()
        patches, text = patches.contiguous(), text.to(patches.dtype).contiguous()
        e, norm = pool_forward(patches, text, sigma)
        ctx.save_for_backward(patches, text, e, norm)
        ctx.sigma = sigma
        return e

    @staticmethod
    def backward(ctx, grad_e):
        patches, text, e, norm = ctx.saved_tensors
        d_patches, d_text = pool_backward(patches, text, ctx.sigma, e, norm, grad_e)
        return d_patches.to(ctx.dtypes[0]), d_text.to(ctx.dtypes[1]), None


def knowledge_embedding(patches: torch.Tensor, raw_text: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """e_b (B, D), float32, fused: see make_dist.objective.knowledge_embedding."""
    return KnowledgePool.apply(patches, raw_text, sigma)
