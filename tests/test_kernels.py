"""The Triton kernels against the dense torch path (SPEC section 4).

On a machine without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py)
on CPU tensors, at small sizes. Inputs are drawn fresh per case; outputs are
poisoned with NaN before each launch to prove every element is written.
"""


import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.contrastive import lse_backward, lse_forward
from kernels.pooling import pool_backward, pool_forward
from make_dist import objective
from tests.test_objective import random_inputs, with_missing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unit(*shape, g, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1).to(DEVICE)


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, err


# ---------------------------------------------------------------------------
# Kernel 1: the column log-sum-exp


@pytest.mark.parametrize("rows,ranks,block_rows,with_valid,seed", [
    (40, 1, 70, True, 0),      # columns not a multiple of the tile
    (17, 3, 24, True, 1),      # column blocks standing for 3 ranks
    (33, 2, 16, False, 2),     # no validity mask (text-to-image: every image is a column)
    (5, 4, 9, True, 3),        # fewer rows than a tile
])
def test_column_lse_matches_dense(rows, ranks, block_rows, with_valid, seed):
    g = torch.Generator().manual_seed(seed)
    D = 24
    x = unit(rows, D, g=g).requires_grad_()
    # The gathered columns of several ranks: each rank's block drawn on its own.
    c = torch.cat([unit(block_rows, D, g=g) for _ in range(ranks)]).requires_grad_()
    valid = (torch.rand(c.shape[0], generator=g) < 0.6).to(DEVICE) if with_valid else None
    if valid is not None:
        valid[:block_rows] = False  # a whole rank's block without valid columns
        valid[-1] = True
    s = torch.tensor([3.0 + 10 * torch.rand((), generator=g).item()], dtype=torch.float64, device=DEVICE,
                     requires_grad=True)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64).to(DEVICE)

    got = kernels.column_logsumexp(x, c, valid, s)
    (got * upstream).sum().backward()
    grads = [t.grad.clone() for t in (x, c, s)]
    for t in (x, c, s):
        t.grad = None
    want = objective.column_logsumexp(x, c, valid, s)
    (want * upstream).sum().backward()

    close(got, want, 2e-6)
    for a, t in zip(grads, (x, c, s)):
        close(a, t.grad, 5e-6)
    if valid is not None:  # invalid columns receive nothing
        assert torch.equal(grads[1][~valid], torch.zeros_like(grads[1][~valid]))


def test_column_lse_writes_every_element():
    g = torch.Generator().manual_seed(5)
    R, C, D = 37, 45, 20
    x, c = unit(R, D, g=g, dtype=torch.float32), unit(C, D, g=g, dtype=torch.float32)
    valid = (torch.rand(C, generator=g) < 0.5).to(DEVICE)
    s = torch.tensor([9.0], device=DEVICE)
    lse = lse_forward(x, c, valid, s, out=torch.full((R,), float("nan"), device=DEVICE))
    assert torch.isfinite(lse).all()
    d_rows = torch.full_like(x, float("nan"))
    d_cols = torch.full_like(c, float("nan"))
    parts = torch.full((2,), float("nan"), device=DEVICE)
    lse_backward(x, c, valid, s, lse, torch.randn(R, generator=g).to(DEVICE), d_rows, d_cols, parts)
    assert torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all() and torch.isfinite(parts).all()


def test_column_lse_bf16_inputs_accumulate_in_fp32():
    g = torch.Generator().manual_seed(6)
    x, c = unit(48, 64, g=g), unit(96, 64, g=g)
    s = torch.tensor([50.0], dtype=torch.float64, device=DEVICE)
    got = kernels.column_logsumexp(x.bfloat16(), c.bfloat16(), None, s)
    assert got.dtype == torch.float32
    want = objective.column_logsumexp(x.bfloat16().double(), c.bfloat16().double(), None, s)
    close(got, want, 2e-3 * 50)  # bf16 products, fp32 sums: rounding of the inputs only


# ---------------------------------------------------------------------------
# Kernel 2: similarity-weighted patch pooling


@pytest.mark.parametrize("B,P,D,sigma,seed", [
    (6, 37, 24, 0.0, 0),   # patches not a multiple of the block
    (4, 16, 32, 0.15, 1),  # sigma > 0 keeps fewer patches
    (3, 9, 20, 5.0, 2),    # no patch passes: e = 0
    (2, 49, 8, -0.2, 3),
])
def test_patch_pool_matches_dense(B, P, D, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    p, t = unit(B, P, D, g=g).requires_grad_(), unit(B, D, g=g).requires_grad_()
    upstream = torch.randn(B, D, generator=g, dtype=torch.float64).to(DEVICE)
    got = kernels.knowledge_embedding(p, t, sigma)
    (got * upstream).sum().backward()
    gp, gt = p.grad.clone(), t.grad.clone()
    p.grad = t.grad = None
    want = objective.knowledge_embedding(p, t, sigma)
    (want * upstream).sum().backward()
    close(got, want, 1e-6)
    close(gp, p.grad, 2e-6)
    close(gt, t.grad, 2e-6)


def test_patch_pool_writes_every_element():
    g = torch.Generator().manual_seed(8)
    B, P, D = 5, 21, 24
    p, t = unit(B, P, D, g=g, dtype=torch.float32), unit(B, D, g=g, dtype=torch.float32)
    nan = lambda *shape: torch.full(shape, float("nan"), device=DEVICE)  # noqa: E731
    e, norm = pool_forward(p, t, 0.0, e=nan(B, D), norm=nan(B))
    assert torch.isfinite(e).all() and torch.isfinite(norm).all()
    dp, dt = pool_backward(p, t, 0.0, e, norm, torch.randn(B, D, generator=g).to(DEVICE),
                           d_patches=torch.full_like(p, float("nan")), d_text=torch.full_like(t, float("nan")))
    assert torch.isfinite(dp).all() and torch.isfinite(dt).all()


# ---------------------------------------------------------------------------
# The whole objective on the kernels


@pytest.mark.parametrize("dkw,slra,subtexts,sigma", [
    (True, True, True, 0.0), (True, True, False, 0.1), (False, True, True, 0.0), (True, False, True, 0.0),
])
def test_make_loss_triton_equals_torch(dkw, slra, subtexts, sigma):
    image, patches, texts, mask, scale = random_inputs(B=6, N=7, D=16, P=10, seed=int(dkw) + 2 * int(slra) + 4 * int(subtexts))
    mask = with_missing(mask)
    mask[5, 3:] = False  # a row of all-invalid subtexts
    kw = dict(lam=0.7, sigma=sigma, dkw=dkw, slra=slra, subtexts=subtexts)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().to(DEVICE).requires_grad_() for x in (image, patches, texts, scale)]
        out = objective.make_loss(*leaves[:3], mask.to(DEVICE), leaves[3], backend=backend, **kw)
        out["total"].backward()
        results[backend] = (out, [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves])
    (want, want_grads), (got, got_grads) = results["torch"], results["triton"]
    for key in ("total", "mkcl", "i2t", "t2i", "slra"):
        close(got[key], want[key], 2e-6)
    for name, a, b in zip(("image", "patches", "texts", "scale"), got_grads, want_grads):
        close(a, b, 5e-6)


def test_auto_backend_picks_torch_on_cpu_tensors():
    image, patches, texts, mask, scale = random_inputs()
    assert objective._ops("auto", image) is objective._TorchOps
    if torch.cuda.is_available():
        assert objective._ops("auto", image.cuda()) is kernels
