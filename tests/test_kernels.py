"""The Triton kernels against the dense torch path (docs/spec.md, section 4).

On a machine without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py)
on CPU tensors, at small sizes. Inputs are drawn fresh per case; outputs are
poisoned with NaN before each launch (and partial sums, through the launch
option `poison`) to prove every element is written.
"""


import pytest
import torch
import torch.nn.functional as F
import triton

import make_dist_kernels as kernels
from make_dist import objective
from make_dist_kernels import contrastive, pooling, tuning
from make_dist_kernels.contrastive import _prepare, flags, lse_backward, lse_forward
from make_dist_kernels.pooling import pool_backward, pool_forward
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


# Partial-sum buffers start as NaN: an element no program writes shows.
POISONED = tuning.Options(poison=True)


def test_column_lse_writes_every_element():
    g = torch.Generator().manual_seed(5)
    R, C, D = 37, 45, 20
    x, c = unit(R, D, g=g, dtype=torch.float32), unit(C, D, g=g, dtype=torch.float32)
    valid = (torch.rand(C, generator=g) < 0.5).to(DEVICE)
    s = torch.tensor([9.0], device=DEVICE)
    lse = lse_forward(x, c, valid, s, out=torch.full((R,), float("nan"), device=DEVICE), options=POISONED)
    assert torch.isfinite(lse).all()
    d_rows = torch.full_like(x, float("nan"))
    d_cols = torch.full_like(c, float("nan"))
    _, _, d_scale = lse_backward(x, c, valid, s, lse, torch.randn(R, generator=g).to(DEVICE), d_rows, d_cols,
                                 options=POISONED)
    assert torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all() and torch.isfinite(d_scale)
    x.requires_grad_(), c.requires_grad_()
    kernels.column_logsumexp(x, c, valid, s, options=POISONED).sum().backward()  # the public keyword, autograd
    assert torch.isfinite(x.grad).all() and torch.isfinite(c.grad).all()


def shipped(*family: tuning.Tuned, D: int = 160) -> list[tuple[int, int]]:
    """(target, index) of each distinct set of configurations the launchers can run
    for a family of kernels (an index past a kernel's list takes its last)."""
    seen, out = set(), []
    block_d = tuning.block_d(D)
    for arch in tuning.TARGETS:
        for i in range(max(k.count() for k in family)):
            picked = tuple(str(k.options(arch, block_d)[min(i, len(k.configs[arch]) - 1)]) for k in family)
            if picked not in seen:
                seen.add(picked)
                out.append((arch, i))
    return out


@pytest.mark.parametrize("dtype,config", [
    pytest.param(dtype, config, id=f"{str(dtype)[6:]}-sm{config[0]}-{config[1]}")
    for dtype in (torch.float32, torch.bfloat16)
    for config in shipped(*(family[dtype == torch.bfloat16] for family in
                            (contrastive.FORWARD, contrastive.ROWS, contrastive.COLS)))])
def test_every_shipped_configuration_matches_dense_with_split_reductions(config, dtype):
    """Each configuration the autotuner may pick, on either target, with the
    columns (forward, row gradients) cut into 3 chunks and the rows (column
    gradients) into 2, the last of each partial. bf16 at D = 160: the
    streamed-D tiles take three chunks and the feature-chunked gradients two;
    float32 (slower under the interpreter) at D = 96, streamed in three. The
    uncut launch (one chunk, written straight into the gradient's own type)
    is what every other test here runs."""
    g = torch.Generator().manual_seed(21)
    R, C, D = 130, 260, 160 if dtype == torch.bfloat16 else 96
    x = unit(R, D, g=g).to(dtype)
    c = unit(C, D, g=g).to(dtype)
    valid = (torch.rand(C, generator=g) < 0.7).to(DEVICE)
    valid[:128] = False  # the first column chunk without a valid column
    s = torch.tensor([20.0], device=DEVICE)
    upstream = torch.randn(R, generator=g).to(DEVICE)
    x64, c64, s64 = (t.detach().double().requires_grad_() for t in (x, c, s))
    want = objective.column_logsumexp(x64, c64, valid, s64)
    (want * upstream.double()).sum().backward()
    assert tuning.fixed_splits(C, 3) == (3, 128) and tuning.fixed_splits(R, 3) == (2, 128)
    lse = lse_forward(x, c, valid, s, config=config, n_splits=3, options=POISONED)
    d_rows, d_cols, d_scale = lse_backward(x, c, valid, s, lse, upstream, config=config, n_splits=3,
                                           options=POISONED)
    close(lse, want, 1e-5 if dtype == torch.float32 else 1e-4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the weights and the stored results rounded
    close_relative(d_rows, x64.grad, tol)
    close_relative(d_cols, c64.grad, tol)
    assert abs(d_scale.item() - s64.grad.item()) <= 1e-4 * abs(s64.grad.item())
    assert torch.equal(d_cols[~valid], torch.zeros_like(d_cols[~valid]))


@pytest.mark.parametrize("wide", [False, True], ids=["32-bit", "64-bit"])
def test_chunks_that_cut_a_tile_count_each_column_and_patch_once(wide):
    """Chunks are ALIGN-aligned so tiles never straddle two, but a program
    must not count past its chunk's end even if one did (ALIGN = 40 here,
    against 32-wide tiles). With 64-bit offsets too: what a launch past 2^31
    elements computes (bench/kernels.py checks such a launch on a GPU)."""
    options = tuning.Options(poison=True, align=40)
    g = torch.Generator().manual_seed(51)
    x, c = unit(90, 40, g=g, dtype=torch.float32), unit(100, 40, g=g, dtype=torch.float32)
    valid = (torch.rand(100, generator=g) < 0.7).to(DEVICE)
    s, upstream = torch.tensor([12.0], device=DEVICE), torch.randn(90, generator=g).to(DEVICE)
    lse = lse_forward(x, c, valid, s, config=1, n_splits=3, wide=wide, options=options)
    d_rows, d_cols, d_scale = lse_backward(x, c, valid, s, lse, upstream, config=1, n_splits=3, wide=wide,
                                           options=options)
    x64, c64, s64 = (t.double().requires_grad_() for t in (x, c, s))
    want = objective.column_logsumexp(x64, c64, valid, s64)
    (want * upstream.double()).sum().backward()
    close(lse, want, 1e-5)
    close_relative(d_rows, x64.grad, 1e-5)
    close_relative(d_cols, c64.grad, 1e-5)
    assert abs(d_scale.item() - s64.grad.item()) <= 1e-4 * abs(s64.grad.item())
    p, t = unit(2, 100, 24, g=g).float(), unit(2, 24, g=g).float()
    e, norm = pool_forward(p, t, 0.0, config=1, n_splits=3, wide=wide, options=options)  # 32-patch tiles, chunks of 40
    dp, dt = pool_backward(p, t, 0.0, e, norm, torch.ones_like(e), config=1, n_splits=3, wide=wide,
                           options=options)
    p64, t64 = p.double().requires_grad_(), t.double().requires_grad_()
    want_e = objective.knowledge_embedding(p64, t64, 0.0)
    want_e.sum().backward()
    close(e, want_e, 1e-6)
    close(dp, p64.grad, 2e-6)
    close(dt, t64.grad, 2e-6)


def test_the_autotuner_times_every_configuration_and_keeps_one():
    """The launch path a GPU takes (Triton's autotuner over the shipped
    configurations, the grid from the chosen constants), run by the
    interpreter with a CPU clock in place of CUDA events."""
    import time

    timed = []

    def cpu_bench(fn, quantiles):
        start = time.perf_counter()
        fn()
        timed.append(fn)
        return [time.perf_counter() - start] * len(quantiles)

    options = tuning.Options(autotune=True, timer=cpu_bench)  # tuners of their own: this clock's
    family = [contrastive.FORWARD[True], contrastive.ROWS[True], contrastive.COLS[True], pooling.FORWARD,
              pooling.BACKWARD]
    g = torch.Generator().manual_seed(41)
    x, c = unit(70, 48, g=g).bfloat16(), unit(90, 48, g=g).bfloat16()
    valid = (torch.rand(90, generator=g) < 0.7).to(DEVICE)
    s = torch.tensor([10.0], device=DEVICE)
    upstream = torch.randn(70, generator=g).to(DEVICE)
    p, t = unit(3, 20, 48, g=g).float(), unit(3, 48, g=g).float()
    for _ in range(2):  # the second call reuses the choice: nothing timed again
        lse = lse_forward(x, c, valid, s, options=options)
        d_rows, d_cols, _ = lse_backward(x, c, valid, s, lse, upstream, options=options)
        e, norm = pool_forward(p, t, 0.0, options=options)
        d_patches, d_text = pool_backward(p, t, 0.0, e, norm, torch.ones_like(e), options=options)
    assert len(timed) == sum(len(t.configs[90]) for t in family)
    assert all(len(t.chosen()) >= 1 and "->" in t.chosen()[0] for t in family)
    x64, c64 = (t.detach().double().requires_grad_() for t in (x, c))
    want = objective.column_logsumexp(x64, c64, valid, s.double())
    (want * upstream.double()).sum().backward()
    close(lse, want, 1e-4)
    close_relative(d_rows, x64.grad, 2e-2)  # the weights and the stored gradients in bf16
    close_relative(d_cols, c64.grad, 2e-2)
    close(e, objective.knowledge_embedding(p.double(), t.double(), 0.0), 1e-6)


def test_splits_fill_the_card_only_when_the_blocks_are_few():
    """One rank's 2,048 images (32 blocks of 64 rows) against 22,528 texts on
    132 SMs: the columns are cut; 22,528 texts as rows are blocks enough."""
    cuda = torch.device("cuda")
    n, length = tuning.splits(2048, 22528, cuda, sms=132)
    assert n == tuning.MAX_SPLITS and length % tuning.ALIGN == 0 and n * length >= 22528
    assert tuning.splits(22528, 2048, cuda, sms=132) == (1, 2048)
    assert tuning.splits(16384, 2048, cuda, sms=132)[0] == 1  # 256 blocks of 64: no partial buffer of 16,384 rows
    assert tuning.splits(2048, 1500, cuda, sms=132)[0] == 1  # chunks shorter than MIN_SPLIT are not worth it


def test_64_bit_offsets_only_past_2_to_the_31_elements():
    """Views of 2^31 elements (no memory behind them): the columns of 200 ranks at
    D = 512 take 64-bit offsets, one element fewer does not; a launch may insist."""
    big, under = torch.zeros(1).expand(2**31), torch.zeros(1).expand(2**31 - 1)
    assert tuning.wide(None, under, big) and not tuning.wide(None, under)
    assert tuning.wide(True, under) and not tuning.wide(False, big)


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
    assert flags(rows.dtype, False, 64)["IEEE"] == (cols_dtype == torch.float32)
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
    e, norm = pool_forward(p, t, 0.0, options=POISONED)
    assert torch.isfinite(e).all() and torch.isfinite(norm).all()
    dp, dt = pool_backward(p, t, 0.0, e, norm, torch.randn(B, D, generator=g).to(DEVICE),
                           d_patches=torch.full_like(p, float("nan")), options=POISONED)
    assert torch.isfinite(dp).all() and torch.isfinite(dt).all()
    p.requires_grad_(), t.requires_grad_()
    kernels.knowledge_embedding(p, t, 0.0, options=POISONED).sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("config", [pytest.param(c, id=f"sm{c[0]}-{c[1]}")
                                    for c in shipped(pooling.FORWARD, pooling.BACKWARD, D=40)])
def test_patch_pool_every_shipped_configuration_with_split_patches(config):
    """Each pooling configuration, the patches of an image whole and cut into
    chunks (200 patches: two chunks of 128 and 72)."""
    g = torch.Generator().manual_seed(31)
    B, P, D = 3, 200, 40
    p, t = unit(B, P, D, g=g).requires_grad_(), unit(B, D, g=g).requires_grad_()
    upstream = torch.randn(B, D, generator=g, dtype=torch.float64).to(DEVICE)
    want = objective.knowledge_embedding(p, t, 0.02)
    (want * upstream).sum().backward()
    p32, t32 = p.detach().float(), t.detach().float()
    for n_splits in (1, 2):
        e, norm = pool_forward(p32, t32, 0.02, config=config, n_splits=n_splits, options=POISONED)
        dp, dt = pool_backward(p32, t32, 0.02, e, norm, upstream.float(), config=config, n_splits=n_splits,
                               options=POISONED)
        close(e, want, 1e-6)
        close(dp, p.grad, 2e-6)
        close(dt, t.grad, 2e-6)


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
    """What the interpreter cannot see: each kernel, in every configuration the
    autotuner may pick, lowers, spills no register and fits the card's shared
    memory: bf16 for sm_90 (an H100's training runs) and float32 for sm_80
    (bf16 training takes the fine-grained term in float32; an A100 has 163
    KB), and the 64-bit builds a launch past 2^31 elements runs (each
    kernel's first configuration). bench/kernels.py --compile-only does all
    four pairs, bench/tritons.sh under each Triton 3.6-3.9. Compiled without
    a GPU (ptxas ships in the triton wheel), in a fresh process: this one
    defined the kernels for the interpreter."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    records, tables = [], ""
    for wide in ([], ["--wide"]):
        out = subprocess.run([sys.executable, "bench/kernels.py", "--compile-only", "--builds", "90:bf16,80:fp32",
                              *wide, "--json", str(tmp_path / "builds.json")], capture_output=True, text=True,
                             env=env, cwd=repo_root, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        records += json.loads((tmp_path / "builds.json").read_text())
        tables += out.stdout
    families = [(arch, dtype, tuned) for arch, dtype in ((90, "bf16"), (80, "fp32"))
                for tuned in [*(family[dtype == "bf16"] for family in (contrastive.FORWARD, contrastive.ROWS,
                                                                       contrastive.COLS)),
                              pooling.FORWARD, pooling.BACKWARD]]
    for wide, shipped in ((False, lambda tuned, arch: len(tuned.configs[arch])), (True, lambda tuned, arch: 1)):
        for arch, dtype, tuned in families:  # every shipped configuration once; 64-bit: the first
            mine = [r for r in records if (r["target"], r["dtype"], r["kernel"], r["config"]["WIDE"])
                    == (f"sm_{arch}", dtype, tuned.fn.__name__, wide)]
            assert len(mine) == shipped(tuned, arch), (arch, dtype, tuned.fn.__name__, wide)
            runs = [meta for meta, _ in tuned.runnable(arch, 512, wide)]  # what a launch may run
            assert [{k: r["config"][k] for k in m} for r, m in zip(mine, runs)] == runs
    assert len(records) == sum(len(t.configs[a]) + 1 for a, _, t in families)
    for r in records:  # nothing spilled to local memory, and the card has the shared memory asked for
        assert r["registers"] > 0 and r["spill_bytes"] == 0 and 0 < r["shared_bytes"] and r["shared_fits"], r
    assert "| _lse_forward | sm_90 | bf16 | R32 C32 K512 w4 s3 |" in tables  # the table a person reads
    assert "| _lse_forward | sm_90 | bf16 | R32 C32 K512 w4 s3 64-bit |" in tables


def test_builds_compared_across_tritons_flag_one_that_spills_under_any(repo_root, tmp_path):
    """bench/kernels.py --compare (bench/tritons.sh's last step): one row per
    build, a column per Triton, and exit status 1 when a build spills or
    overflows under one of them."""
    import json
    import subprocess
    import sys

    def record(version, kernel, spill, fits=True):
        return {"kernel": kernel, "target": "sm_90", "triton": version, "dtype": "bf16", "registers": 200,
                "spill_bytes": spill, "shared_bytes": 30 * 1024, "shared_fits": fits,
                "config": {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 8, "num_stages": 3, "WIDE": False}}

    files = []
    for version, spills in (("3.6.0", 88), ("3.8.0", 0)):
        files.append(tmp_path / f"{version}.json")
        files[-1].write_text(json.dumps([record(version, "_lse_backward_rows", spills),
                                         record(version, "_lse_forward", 0)]))
    run = subprocess.run([sys.executable, "bench/kernels.py", "--compare", *map(str, files)], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "| kernel | target | dtype | config | triton 3.6.0 | triton 3.8.0 | lean |" in run.stdout
    assert "| _lse_backward_rows | sm_90 | bf16 | R64 C64 w8 s3 | 200 / 88 / 30 | 200 / 0 / 30 | NO |" in run.stdout
    assert "| _lse_forward | sm_90 | bf16 | R64 C64 w8 s3 | 200 / 0 / 30 | 200 / 0 / 30 | yes |" in run.stdout
    assert "1 of 2 builds not lean" in run.stdout
    files[0].write_text(json.dumps([record("3.6.0", "_lse_backward_rows", 0), record("3.6.0", "_lse_forward", 0)]))
    run = subprocess.run([sys.executable, "bench/kernels.py", "--compare", *map(str, files)], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "0 of 2 builds not lean" in run.stdout, run.stdout + run.stderr


def test_auto_backend_picks_torch_on_cpu_tensors():
    image, patches, texts, mask, scale = random_inputs()
    assert objective._ops("auto", image) is objective._TorchOps
    if torch.cuda.is_available():
        assert objective._ops("auto", image.cuda()) is kernels
