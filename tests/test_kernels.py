"""The Triton kernels against the dense torch path (docs/spec.md, section 4).

On a machine without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py)
on CPU tensors, at small sizes. Inputs are drawn fresh per case; outputs are
poisoned with NaN before each launch to prove every element is written.
"""


import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
from kernels.contrastive import _prepare, launch_meta, lse_backward, lse_forward
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
    row_blocks = triton.cdiv(R, launch_meta(torch.float32, True, D, backward=True)["BLOCK_R"])
    parts = torch.full((row_blocks,), float("nan"), device=DEVICE)  # the scale's gradient, a part per row block
    lse_backward(x, c, valid, s, lse, torch.randn(R, generator=g).to(DEVICE), d_rows, d_cols, parts)
    assert torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all() and torch.isfinite(parts).all()


def close_relative(a, b, tol):
    """Largest error as a fraction of the largest reference value."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item() / b.double().abs().max().clamp_min(1e-30).item()
    assert err <= tol, err


@pytest.mark.parametrize("cols_dtype", [torch.bfloat16, torch.float32])
def test_column_lse_bf16_forward_and_backward(cols_dtype):
    """The GPU branch (bf16 products, the probabilities rounded to bf16 for the
    backward products, bf16 stores), run by the interpreter as on a card.
    float32 columns (the knowledge embeddings) take the rows to float32."""
    g = torch.Generator().manual_seed(6)
    x = unit(48, 64, g=g).bfloat16().requires_grad_()
    c = unit(96, 64, g=g).to(cols_dtype).requires_grad_()
    valid = (torch.rand(96, generator=g) < 0.7).to(DEVICE)
    s = torch.tensor([50.0], dtype=torch.float64, device=DEVICE, requires_grad=True)
    upstream = torch.rand(48, generator=g, dtype=torch.float64).to(DEVICE)
    got = kernels.column_logsumexp(x, c, valid, s)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and c.grad.dtype == cols_dtype
    rows, _, _ = _prepare(x, c, None)  # bf16 with bf16: the tensor-core branch; with float32: IEEE float32
    assert launch_meta(rows.dtype, False, 64)["IEEE"] == (cols_dtype == torch.float32)
    # the reference: the same (rounded) values in float64
    x64, c64, s64 = (t.detach().double().requires_grad_() for t in (x, c, s))
    want = objective.column_logsumexp(x64, c64, valid, s64)
    (want * upstream).sum().backward()
    close(got, want, 1e-4)  # float32 sums of exact products
    assert abs(s.grad.item() - s64.grad.item()) <= 1e-4 * abs(s64.grad.item())
    # gradients: the weights (and, for bf16 columns, the results) rounded to bf16
    close_relative(x.grad, x64.grad, 1e-2)
    close_relative(c.grad, c64.grad, 1e-2 if cols_dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(c.grad[~valid], torch.zeros_like(c.grad[~valid]))


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


def test_patch_pool_bf16_forward_and_backward():
    g = torch.Generator().manual_seed(9)
    p, t = unit(5, 37, 32, g=g).bfloat16().requires_grad_(), unit(5, 32, g=g).bfloat16().requires_grad_()
    upstream = torch.randn(5, 32, generator=g, dtype=torch.float64).to(DEVICE)
    got = kernels.knowledge_embedding(p, t, 0.05)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32 and p.grad.dtype == t.grad.dtype == torch.bfloat16
    p64, t64 = (x.detach().double().requires_grad_() for x in (p, t))
    want = objective.knowledge_embedding(p64, t64, 0.05)
    (want * upstream).sum().backward()
    close(got, want, 1e-5)  # float32 inside
    close_relative(p.grad, p64.grad, 1e-2)  # stored as bf16
    close_relative(t.grad, t64.grad, 1e-2)


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


@pytest.mark.parametrize("dkw,slra,mkcl_subtexts,sigma", [
    (True, True, True, 0.0), (True, True, False, 0.1), (False, True, True, 0.0), (True, False, True, 0.0),
])
def test_loss_on_the_kernels_equals_the_dense_loss(dkw, slra, mkcl_subtexts, sigma):
    image, patches, texts, mask, scale = random_inputs(B=6, N=7, D=16, P=10,
                                                       seed=int(dkw) + 2 * int(slra) + 4 * int(mkcl_subtexts))
    mask = with_missing(mask)
    mask[5, 3:] = False  # a row of all-invalid subtexts
    kw = dict(lam=0.7, sigma=sigma, dkw=dkw, slra=slra, mkcl_subtexts=mkcl_subtexts)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().to(DEVICE).requires_grad_() for x in (image, patches, texts, scale)]
        out = objective.MakeLoss(backend=backend, **kw)(*leaves[:3], mask.to(DEVICE), leaves[3])
        out["total"].backward()
        results[backend] = (out, [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves])
    (want, want_grads), (got, got_grads) = results["torch"], results["triton"]
    for key in ("total", "mkcl", "i2t", "t2i", "slra"):
        close(got[key], want[key], 2e-6)
    for name, a, b in zip(("image", "patches", "texts", "scale"), got_grads, want_grads):
        close(a, b, 5e-6)


def test_loss_on_the_kernels_equals_the_dense_loss_on_bf16():
    """Values and gradients of the whole objective on bf16 embeddings."""
    image, patches, texts, mask, scale = random_inputs(B=8, N=7, D=32, P=10, seed=12)
    mask = with_missing(mask)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.bfloat16().to(DEVICE).requires_grad_() for x in (image, patches, texts)]
        out = objective.MakeLoss(backend=backend)(*leaves, mask.to(DEVICE), torch.tensor([30.0], device=DEVICE))
        out["total"].backward()
        results[backend] = (out, [x.grad for x in leaves])
    (want, want_grads), (got, got_grads) = results["torch"], results["triton"]
    for key in ("total", "mkcl", "i2t", "t2i", "slra"):
        close(got[key], want[key], 1e-5)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.bfloat16
        close_relative(a, b, 2e-2)


def test_kernels_take_empty_inputs():
    """A rank without samples launches nothing and gets empty or zero gradients."""
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    c = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    s = torch.tensor([10.0], device=DEVICE, requires_grad=True)
    lse = kernels.column_logsumexp(x, c, None, s)
    lse.sum().backward()
    assert lse.shape == (0,) and torch.equal(c.grad, torch.zeros_like(c)) and s.grad.item() == 0
    p, t = torch.zeros(0, 4, 16, device=DEVICE, requires_grad=True), torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    e = kernels.knowledge_embedding(p, t, 0.0)
    e.sum().backward()
    assert e.shape == (0, 16) and p.grad.shape == p.shape


def test_the_kernels_compile_for_the_cards_and_fit_them(repo_root, tmp_path):
    """What the interpreter cannot see: each kernel, configured as its launcher
    configures it, lowers, spills no register and fits the card's shared memory. bf16 for sm_90
    (an H100's training runs), float32 for sm_80 (bf16 training takes the
    fine-grained term in float32; an A100 has 163 KB). Compiled without a GPU
    by bench/kernels.py --compile-only (ptxas ships in the triton wheel), in a
    fresh process: this one defined the kernels for the interpreter."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "bench/kernels.py", "--compile-only", "--builds", "90:bf16,80:fp32",
                          "--json", str(tmp_path / "builds.json")], capture_output=True, text=True, env=env,
                         cwd=repo_root, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    records = json.loads((tmp_path / "builds.json").read_text())
    assert sorted((r["target"], r["dtype"], r["kernel"]) for r in records) == sorted(
        (target, dtype, kernel) for target, dtype in (("sm_90", "bf16"), ("sm_80", "fp32"))
        for kernel in ("_lse_forward", "_lse_backward_rows", "_lse_backward_cols", "_pool_forward", "_pool_backward"))
    for r in records:  # nothing spilled to local memory, and the card has the shared memory asked for
        assert r["registers"] > 0 and r["spill_bytes"] == 0 and 0 < r["shared_bytes"] and r["shared_fits"], r
    assert "| _lse_forward | sm_90 | bf16 |" in out.stdout  # the table a person reads


def test_auto_backend_picks_torch_on_cpu_tensors():
    image, patches, texts, mask, scale = random_inputs()
    assert objective._ops("auto", image) is objective._TorchOps
    if torch.cuda.is_available():
        assert objective._ops("auto", image.cuda()) is kernels
