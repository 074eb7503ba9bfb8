"""Similarity-weighted patch pooling (docs/spec.md, section 4, kernel 2; Eq. 5).

    r_q = t . p_q,  z_q = r_q [r_q >= sigma],  u = sum_q z_q p_q,  e = u / max(|u|, eps)

The kernels make the passes over the patches, the only large operand: the
forward one (relevance and pooled sum together), the backward one more
(recomputing the relevance, writing the patch gradients, summing the
text's). One program takes one image's patches, or a chunk of them when the
images alone are too few to fill the card (tuning.splits; the partial sums
are added by the launcher). What is per image and small, the norm and its
gradient, is plain torch on (B, D). A program holds a BLOCK_P x D tile of
patches: tiling D would read every patch twice in a kernel bound by memory.
Extra memory: (splits, B, D) float32 partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .tuning import widen

EPS = 1e-12  # as F.normalize


@triton.jit
def _patch_tile(PATCHES, b, q, d, P, end, D):
    """Patches q of image b (P patches each), zero at and past `end`."""
    inside = (q[:, None] < end) & (d[None, :] < D)
    return tl.load(PATCHES + b * P * D + q[:, None] * D + d[None, :], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _pool_forward(PATCHES, TEXT, U, B, P, D, SPLIT, sigma,
                  BLOCK_D: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr):
    """U[split, b] = sum over the patches q of chunk `split` of z_q p_q."""
    b, split = widen(tl.program_id(0), WIDE), tl.program_id(1)  # WIDE: 2^31 patch elements or more
    d = tl.arange(0, BLOCK_D)
    t = tl.load(TEXT + b * D + d, mask=d < D, other=0.0).to(tl.float32)
    u = tl.zeros([BLOCK_D], tl.float32)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, P)
    for start in range(lo, hi, BLOCK_P):
        q = start + tl.arange(0, BLOCK_P)
        p = _patch_tile(PATCHES, b, q, d, P, hi, D)
        r = tl.sum(p * t[None, :], 1)
        z = tl.where((r >= sigma) & (q < hi), r, 0.0)
        u += tl.sum(z[:, None] * p, 0)
    tl.store(U + (split * B + b) * D + d, u, mask=d < D)


@triton.jit
def _pool_backward(PATCHES, TEXT, DU, DP, DT, B, P, D, SPLIT, sigma,
                   BLOCK_D: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Given du = dL/du: DP[b, q] = z_q du + (du . p_q)[kept] t for the patches of
    chunk `split`; DT[split, b] = their sum of (du . p_q)[kept] p_q."""
    b, split = widen(tl.program_id(0), WIDE), tl.program_id(1)  # WIDE: 2^31 patch elements or more
    d = tl.arange(0, BLOCK_D)
    t = tl.load(TEXT + b * D + d, mask=d < D, other=0.0).to(tl.float32)
    du = tl.load(DU + b * D + d, mask=d < D, other=0.0)
    dt = tl.zeros([BLOCK_D], tl.float32)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, P)
    for start in range(lo, hi, BLOCK_P):
        q = start + tl.arange(0, BLOCK_P)
        p = _patch_tile(PATCHES, b, q, d, P, hi, D)
        r = tl.sum(p * t[None, :], 1)
        keep = (r >= sigma) & (q < hi)
        z = tl.where(keep, r, 0.0)
        dr = tl.where(keep, tl.sum(p * du[None, :], 1), 0.0)
        dp = z[:, None] * du[None, :] + dr[:, None] * t[None, :]
        tl.store(DP + b * P * D + q[:, None] * D + d[None, :], dp.to(DP.dtype.element_ty),
                 mask=(q[:, None] < hi) & (d[None, :] < D))
        dt += tl.sum(dr[:, None] * p, 0)
    tl.store(DT + (split * B + b) * D + d, dt, mask=d < D)


# Configurations (the first the default; autotuned on a GPU, kernels/tuning.py),
# spill-free under each Triton from 3.6 to 3.9 (bench/tritons.sh). The backward
# holds more per program (the text's gradient, the relevance): on sm_80 under
# 3.9, 16 patches spilled at 8 warps (8 B) and in float32 at 4 (16 B), 32 at 8
# warps in float32 (8 B); 16 warps share a 16-patch tile out. sm_90 keeps 8.
FORWARD_CONFIGS = [{"BLOCK_P": 16, "num_warps": 4, "num_stages": 3}, {"BLOCK_P": 32, "num_warps": 8, "num_stages": 3},
                   {"BLOCK_P": 8, "num_warps": 4, "num_stages": 3}]
BACKWARD_80 = [{"BLOCK_P": 16, "num_warps": 16, "num_stages": 3}, {"BLOCK_P": 8, "num_warps": 4, "num_stages": 3}]
BACKWARD_90 = BACKWARD_80 + [{"BLOCK_P": 16, "num_warps": 8, "num_stages": 3}]
FORWARD = tuning.Tuned(_pool_forward, {80: FORWARD_CONFIGS, 90: FORWARD_CONFIGS}, ["P", "D"])
BACKWARD = tuning.Tuned(_pool_backward, {80: BACKWARD_80, 90: BACKWARD_90}, ["P", "D"])
MIN_SPLIT = 64  # patches per chunk at least (an image has 196 at ViT-B/16, 224 px)


def _splits(B: int, P: int, device, n_splits, options: tuning.Options):
    return tuning.splits(B, P, device, block=1, min_split=MIN_SPLIT, n=n_splits, align=options.align)


def builds(dtype: torch.dtype, D: int, arch: int, wide: bool = False) -> list[tuple]:
    """(kernel, argument types, constants, options) of each kernel on `dtype`
    patches and texts of width D for sm_<arch>, in each configuration shipped
    (see kernels/build.py); wide: 64-bit offsets, the first configuration only
    (what such a launch runs)."""
    t = tuning.POINTER[dtype]
    ints = {"B": "i32", "P": "i32", "D": "i32", "SPLIT": "i32", "sigma": "fp32"}
    out = []
    for tuned, signature in ((FORWARD, {"PATCHES": t, "TEXT": t, "U": "*fp32", **ints}),
                             (BACKWARD, {"PATCHES": t, "TEXT": t, "DU": "*fp32", "DP": t, "DT": "*fp32", **ints})):
        for meta, launch in tuned.runnable(arch, tuning.block_d(D), wide):
            out.append((tuned.fn, signature, {"BLOCK_D": tuning.block_d(D), "WIDE": wide, **meta}, launch))
    return out


def pool_forward(patches, text, sigma: float, config=None, n_splits=None, wide=None, options=tuning.DEFAULT):
    """(e, |u|): the knowledge embeddings (B, D) float32 and the pooled sums' norms (B,).
    wide: 64-bit offsets (default: when the patches have 2^31 elements or more);
    options: tuning.Options."""
    B, P, D = patches.shape
    if B == 0:  # a rank without samples: nothing to launch
        return patches.new_zeros(0, D, dtype=torch.float32), patches.new_zeros(0, dtype=torch.float32)
    n, length = _splits(B, P, patches.device, n_splits, options)
    u = tuning.partials(n, B, D, device=patches.device, options=options)
    FORWARD(lambda m: (B, n), patches, text, u, B, P, D, length, float(sigma), device=patches.device,
            config=config, options=options, BLOCK_D=tuning.block_d(D), WIDE=tuning.wide(wide, patches))
    u = u.sum(0)
    norm = u.norm(dim=1)
    return u / norm.clamp_min(EPS)[:, None], norm


def pool_backward(patches, text, sigma: float, e, norm, grad_e, d_patches=None, config=None, n_splits=None,
                  wide=None, options=tuning.DEFAULT):
    """(d_patches, d_text) from the upstream gradient of e (wide, options: as pool_forward)."""
    B, P, D = patches.shape
    d_patches = torch.empty_like(patches) if d_patches is None else d_patches
    if B == 0:
        return d_patches, torch.zeros_like(text)
    de = grad_e.float()
    # Through e = u / max(|u|, eps): the clamp passes no gradient to |u|.
    du = torch.where((norm > EPS)[:, None], (de - e * (e * de).sum(1, keepdim=True)) / norm.clamp_min(EPS)[:, None],
                     de / EPS).contiguous()
    n, length = _splits(B, P, patches.device, n_splits, options)
    dt = tuning.partials(n, B, D, device=patches.device, options=options)
    BACKWARD(lambda m: (B, n), patches, text, du, d_patches, dt, B, P, D, length, float(sigma),
             device=patches.device, config=config, options=options, BLOCK_D=tuning.block_d(D),
             WIDE=tuning.wide(wide, patches))
    return d_patches, dt.sum(0).to(text.dtype)


class KnowledgePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patches, text, sigma, options):
        ctx.dtypes = (patches.dtype, text.dtype)
        if patches.dtype == torch.float64:  # the kernels compute in float32
            patches, text = patches.float(), text.float()
        patches, text = patches.contiguous(), text.to(patches.dtype).contiguous()
        e, norm = pool_forward(patches, text, sigma, options=options)
        ctx.save_for_backward(patches, text, e, norm)
        ctx.sigma, ctx.options = sigma, options
        return e

    @staticmethod
    def backward(ctx, grad_e):
        patches, text, e, norm = ctx.saved_tensors
        d_patches, d_text = pool_backward(patches, text, ctx.sigma, e, norm, grad_e, options=ctx.options)
        return d_patches.to(ctx.dtypes[0]), d_text.to(ctx.dtypes[1]), None, None


def knowledge_embedding(patches: torch.Tensor, raw_text: torch.Tensor, sigma: float = 0.0, *,
                        options: tuning.Options = tuning.DEFAULT) -> torch.Tensor:
    """e_b (B, D), float32, fused: see make_dist.objective.knowledge_embedding
    (options: how the kernels launch, tuning.Options)."""
    return KnowledgePool.apply(patches, raw_text, sigma, options)
