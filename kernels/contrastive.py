"""Fused multi-positive contrastive log-sum-exp (docs/spec.md, section 4, kernel 1).

    lse[r] = log sum over valid columns c of exp(scale * rows[r] . cols[c])

Every term of the MAKE loss is `sum_r a_r lse_r - (positive logits)`, so this
is the only operation that touches rows x columns. The forward tiles the
columns and keeps an online log-sum-exp per row; the backward recomputes the
tiles: one kernel for the row gradients (and the scale's), one for the column
gradients. Nothing of size rows x columns is ever stored.

Work is cut to fill the card (kernels/tuning.py): when the rows are too few
blocks (one rank's 2,048 images), the columns are cut into chunks, one
program each, and the launcher combines the chunks' log-sum-exps and adds
their row gradients; likewise the rows for the column gradients. The
feature dimension may be streamed in chunks (BLOCK_K) and the gradients
written a chunk of features per program (BLOCK_DO), so larger tiles fit a
program's registers. Extra memory: at most 8 partial sums per row (forward)
or per row and feature (backward), the same per column; rows + columns.

Why two backward kernels and not one fused: a single pass would add each
tile's column gradients into global memory with atomics, D / BLOCK_R of them
per logit (8 float32 read-modify-writes at D = 512 and 64-row tiles), to
save one recomputation of the logit, 2 D = 1,024 FLOP. On an H100 (about
783 bf16 TFLOP/s against 3.35 TB/s of memory) the atomics' 32 bytes take
as long as some 7,500 FLOP: an estimate, not a measurement, that the fused
pass is slower at this width (docs/BENCHMARKS.md).

Products accumulate in float32: bf16 inputs go through the tensor cores with
float32 accumulation; float32 inputs use exact float32 products (not TF32),
since scale (up to 100) magnifies any error in a logit. Rows and columns of
different types are both taken in the wider one (bf16 subtexts against the
float32 knowledge embeddings multiply in float32), so a column enters the
log-sum-exp with the very value the caller's positive logit reads.

Under Triton's interpreter (CI, no GPU) the bf16 code runs as it would on a
GPU, every cast and store included; only the product itself is taken on
float32 copies of the bf16 operands, because the interpreter's bf16 tl.dot
returns garbage (triton 3.8). That is what a tensor core computes: the
product of two bf16 numbers is exact in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .tuning import widen


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32. IEEE: float32 operands, exact float32 products. Else
    bf16 operands on the tensor cores; UPCAST (the interpreter) multiplies the
    same bf16 values in float32 (see the module docstring)."""
    if IEEE or UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _index(first, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """first .. first + BLOCK - 1, the rows or columns a program takes; 64-bit when
    WIDE (tensors of 2^31 elements or more: the columns of some 200 ranks at D = 512)."""
    return widen(first + tl.arange(0, BLOCK), WIDE)


@triton.jit
def _tile(T, idx, n, k, D, BLOCK: tl.constexpr):
    """T[idx, k:k + BLOCK] as (len(idx), BLOCK), zero outside the tensor."""
    d = k + tl.arange(0, BLOCK)
    return tl.load(T + idx[:, None] * D + d[None, :], mask=(idx[:, None] < n) & (d[None, :] < D), other=0.0)


@triton.jit
def _held(T, idx, n, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole tile T[idx, :] when the configuration holds it (BLOCK_K spans D);
    else nothing (the logits stream D in BLOCK_K chunks)."""
    if BLOCK_K == BLOCK_D:
        t = _tile(T, idx, n, 0, D, BLOCK_D)
    else:
        t = 0.0
    return t


@triton.jit
def _raw_logits(X, C, x, c, rows, cols, R, NC, D, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """rows . cols, a (len(rows), len(cols)) float32 tile: from the held tiles x
    and c, or streaming D in BLOCK_K chunks (no program holds all D of its rows)."""
    if BLOCK_K == BLOCK_D:
        acc = _dot(x, tl.trans(c), IEEE, UPCAST)
    else:
        acc = _dot(_tile(X, rows, R, 0, D, BLOCK_K), tl.trans(_tile(C, cols, NC, 0, D, BLOCK_K)), IEEE, UPCAST)
        for k in range(BLOCK_K, D, BLOCK_K):
            acc += _dot(_tile(X, rows, R, k, D, BLOCK_K), tl.trans(_tile(C, cols, NC, k, D, BLOCK_K)),
                        IEEE, UPCAST)
    return acc


@triton.jit
def _out_tile(T, held, idx, n, d0, D, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_D: tl.constexpr):
    """T[idx, d0:d0 + BLOCK_DO], the features this program writes gradients for."""
    if BLOCK_K == BLOCK_D:
        if BLOCK_DO == BLOCK_D:
            t = held
        else:
            t = _tile(T, idx, n, d0, D, BLOCK_DO)
    else:
        t = _tile(T, idx, n, d0, D, BLOCK_DO)
    return t


@triton.jit
def _valid(VALID, cols, end, HAS_VALID: tl.constexpr):
    """Which of the columns `cols` take part: those before `end` (the end of the
    columns, or of this program's chunk of them) that VALID marks."""
    ok = cols < end
    if HAS_VALID:
        ok = ok & (tl.load(VALID + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _row_stats(LSE, G, rows, end):
    """The rows' log-sum-exp and upstream gradient; a row at or past `end` (the
    end of the rows, or of this program's chunk of them) or without any valid
    column (lse = -inf) gets no gradient."""
    row_ok = rows < end
    lse = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    g = tl.where(lse == float("-inf"), 0.0, g)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    return lse, g


@triton.jit
def _lse_forward(X, C, VALID, LSE, SCALE, R, NC, D, SPLIT,
                 HAS_VALID: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
                 WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """LSE[split, r]: log-sum-exp of row r over the valid columns of chunk `split`
    ([split * SPLIT, (split + 1) * SPLIT)), -inf if it has none."""
    rows = _index(tl.program_id(0) * BLOCK_R, BLOCK_R, WIDE)
    split = tl.program_id(1)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, NC)
    s = tl.load(SCALE).to(tl.float32)
    x = _held(X, rows, R, D, BLOCK_K, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_C):
        cols = _index(start, BLOCK_C, WIDE)
        c = _held(C, cols, NC, D, BLOCK_K, BLOCK_D)
        raw = _raw_logits(X, C, x, c, rows, cols, R, NC, D, IEEE, UPCAST, BLOCK_K, BLOCK_D)
        logits = tl.where(_valid(VALID, cols, hi, HAS_VALID)[None, :], raw * s, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid column yet
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        m = m_new
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(LSE + split * R + rows, lse, mask=rows < R)


@triton.jit
def _lse_backward_rows(X, C, VALID, LSE, G, DX, DS, SCALE, R, NC, D, SPLIT,
                       HAS_VALID: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_DO: tl.constexpr):
    """Over the columns of chunk `split` and the features [d0, d0 + BLOCK_DO):
    DX[split, r, d] = s sum_c g_r p_rc cols_c[d];  DS[split, r] = g_r sum_c p_rc (rows_r . cols_c)
    (written by the programs of the first feature chunk)."""
    rows = _index(tl.program_id(0) * BLOCK_R, BLOCK_R, WIDE)
    split = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_DO
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, NC)
    lse, g = _row_stats(LSE, G, rows, R)
    s = tl.load(SCALE).to(tl.float32)
    x = _held(X, rows, R, D, BLOCK_K, BLOCK_D)
    dx = tl.zeros([BLOCK_R, BLOCK_DO], tl.float32)
    ds = tl.zeros([BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_C):
        cols = _index(start, BLOCK_C, WIDE)
        c = _held(C, cols, NC, D, BLOCK_K, BLOCK_D)
        raw = _raw_logits(X, C, x, c, rows, cols, R, NC, D, IEEE, UPCAST, BLOCK_K, BLOCK_D)
        p = tl.where(_valid(VALID, cols, hi, HAS_VALID)[None, :], tl.exp(raw * s - lse[:, None]), 0.0)
        gp = g[:, None] * p
        c_out = _out_tile(C, c, cols, NC, d0, D, BLOCK_K, BLOCK_DO, BLOCK_D)
        dx += _dot(gp.to(c_out.dtype), c_out, IEEE, UPCAST)  # bf16 columns: the weights rounded to bf16 too
        ds += tl.sum(gp * raw, 1)
    d = d0 + tl.arange(0, BLOCK_DO)
    tl.store(DX + (split * R + rows)[:, None] * D + d[None, :], (dx * s).to(DX.dtype.element_ty),
             mask=(rows[:, None] < R) & (d[None, :] < D))
    tl.store(DS + split * R + rows, ds, mask=(rows < R) & (d0 == 0))


@triton.jit
def _lse_backward_cols(X, C, VALID, LSE, G, DC, SCALE, R, NC, D, SPLIT,
                       HAS_VALID: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_DO: tl.constexpr):
    """Over the rows of chunk `split` and the features [d0, d0 + BLOCK_DO):
    DC[split, c, d] = s sum_r g_r p_rc rows_r[d] (0 for invalid columns)."""
    cols = _index(tl.program_id(0) * BLOCK_C, BLOCK_C, WIDE)
    split = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_DO
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, R)
    ok = _valid(VALID, cols, NC, HAS_VALID)
    s = tl.load(SCALE).to(tl.float32)
    c = _held(C, cols, NC, D, BLOCK_K, BLOCK_D)
    dc = tl.zeros([BLOCK_C, BLOCK_DO], tl.float32)
    for start in range(lo, hi, BLOCK_R):
        rows = _index(start, BLOCK_R, WIDE)
        lse, g = _row_stats(LSE, G, rows, hi)
        x = _held(X, rows, R, D, BLOCK_K, BLOCK_D)
        raw = _raw_logits(X, C, x, c, rows, cols, R, NC, D, IEEE, UPCAST, BLOCK_K, BLOCK_D)
        gp = g[:, None] * tl.where(ok[None, :], tl.exp(raw * s - lse[:, None]), 0.0)
        x_out = _out_tile(X, x, rows, R, d0, D, BLOCK_K, BLOCK_DO, BLOCK_D)
        dc += _dot(tl.trans(gp).to(x_out.dtype), x_out, IEEE, UPCAST)
    d = d0 + tl.arange(0, BLOCK_DO)
    tl.store(DC + (split * NC + cols)[:, None] * D + d[None, :], (dc * s).to(DC.dtype.element_ty),
             mask=(cols[:, None] < NC) & (d[None, :] < D))


# ---------------------------------------------------------------------------
# Configurations. BLOCK_K: the feature chunk the logits stream ("D": the
# whole row held, loaded once per program). BLOCK_DO: the features one
# backward program writes gradients for (under "D", the logits are
# recomputed once per chunk of D / BLOCK_DO). Tiles along a split dimension
# (columns forward and for the row gradients, rows for the column gradients)
# are at most tuning.ALIGN. tl.dot needs every dimension >= 16. bf16 goes
# through the tensor cores; float32 takes exact products (no TF32), smaller
# tiles and two stages (a 32 x 512 float32 tile in three stages overflowed
# an A100's shared memory). The first of each list is the default (the
# interpreter's, and what a 64-bit launch runs); on a GPU the autotuner
# times them all. Every build is spill-free and within the card's shared
# memory under Triton 3.6-3.9 (docs/BENCHMARKS.md).


def _cfg(num_warps, num_stages, **blocks):
    return {**blocks, "num_warps": num_warps, "num_stages": num_stages}


# The first, the tiles every kernel ran in before the autotuner (32 x 32, the
# whole row held); then larger tiles that stream D. Every build must be
# spill-free under each Triton from 3.6 (torch 2.11, the GPU hosts') to 3.9
# (bench/tritons.sh): register allocation moves between versions, so tiles
# at the 255-register ceiling are avoided. Dropped for spilling: bf16
# R64 C64 K64 DO128 backward (16-136 B under 3.6, 3.7 or 3.9; streaming
# K32 instead holds fewer operands), sm_80 rows R64 C32 K64 DO256 (8 B),
# float32 R32 C32 K32 DO128 at 4 warps (shipped at 8), and every float32
# column-gradient build that holds the whole row (K512: 7-10 KB under 3.9).
HELD_32 = dict(BLOCK_R=32, BLOCK_C=32, BLOCK_K="D")
STREAMED = dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=32, BLOCK_DO=128)
HALF_FORWARD = [_cfg(4, 3, **HELD_32), _cfg(8, 3, BLOCK_R=64, BLOCK_C=64, BLOCK_K=64),
                _cfg(8, 3, BLOCK_R=128, BLOCK_C=64, BLOCK_K=64)]
HALF_ROWS_80 = [_cfg(8, 3, **HELD_32, BLOCK_DO="D"), _cfg(8, 3, **STREAMED)]
HALF_ROWS_90 = HALF_ROWS_80 + [_cfg(8, 3, BLOCK_R=64, BLOCK_C=32, BLOCK_K=64, BLOCK_DO=256)]
HALF_COLS = [_cfg(8, 3, **HELD_32, BLOCK_DO="D"), _cfg(8, 3, **STREAMED),
             _cfg(8, 3, BLOCK_R=32, BLOCK_C=64, BLOCK_K=64, BLOCK_DO=256)]
HELD_16 = dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K="D")
FP32_FORWARD = [_cfg(4, 2, **HELD_16), _cfg(4, 2, BLOCK_R=32, BLOCK_C=32, BLOCK_K=32)]
FP32_STREAMED = _cfg(8, 2, BLOCK_R=32, BLOCK_C=32, BLOCK_K=32, BLOCK_DO=128)
FP32_ROWS = [_cfg(4, 2, **HELD_16, BLOCK_DO="D"), FP32_STREAMED]
FP32_COLS_80 = [FP32_STREAMED]
FP32_COLS_90 = FP32_COLS_80 + [_cfg(4, 2, BLOCK_R=16, BLOCK_C=16, BLOCK_K=128, BLOCK_DO=128)]  # sm_80: 80 B

KEY = ["R", "NC", "D"]
# {half precision?: the kernel and its configurations per target}
FORWARD = {True: tuning.Tuned(_lse_forward, {80: HALF_FORWARD, 90: HALF_FORWARD}, KEY),
           False: tuning.Tuned(_lse_forward, {80: FP32_FORWARD, 90: FP32_FORWARD}, KEY)}
ROWS = {True: tuning.Tuned(_lse_backward_rows, {80: HALF_ROWS_80, 90: HALF_ROWS_90}, KEY),
        False: tuning.Tuned(_lse_backward_rows, {80: FP32_ROWS, 90: FP32_ROWS}, KEY)}
COLS = {True: tuning.Tuned(_lse_backward_cols, {80: HALF_COLS, 90: HALF_COLS}, KEY),
        False: tuning.Tuned(_lse_backward_cols, {80: FP32_COLS_80, 90: FP32_COLS_90}, KEY)}


# ---------------------------------------------------------------------------
# Launchers (the `out` buffers let tests poison outputs and see each element written)


def _prepare(rows, cols, col_valid):
    """Rows and columns in one type, the wider of theirs (float64 computes in
    float32; bf16 or fp16 with float32 is float32: an exact widening)."""
    same_half = rows.dtype == cols.dtype and rows.dtype in (torch.bfloat16, torch.float16)
    dtype = rows.dtype if same_half else torch.float32
    valid = col_valid.to(torch.int8).contiguous() if col_valid is not None else None
    return rows.to(dtype).contiguous(), cols.to(dtype).contiguous(), valid


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def flags(dtype: torch.dtype, has_valid: bool, D: int, wide: bool = False) -> dict:
    """The constants every kernel takes besides its configuration. wide: 64-bit
    offsets (some tensor of the launch has 2^31 elements or more)."""
    return dict(HAS_VALID=has_valid, IEEE=dtype == torch.float32, UPCAST=tuning.INTERPRETED,
                BLOCK_D=tuning.block_d(D), WIDE=wide)


def builds(dtype: torch.dtype, D: int, arch: int, has_valid: bool = True, wide: bool = False) -> list[tuple]:
    """(kernel, argument types, constants, options) of each kernel on `dtype`
    rows and columns of width D for sm_<arch>, in each configuration shipped
    (what kernels/build.py compiles). wide: with 64-bit offsets, in the one
    configuration such a launch runs (the first)."""
    t = tuning.POINTER[dtype]
    ints = {"R": "i32", "NC": "i32", "D": "i32", "SPLIT": "i32"}
    const = {**flags(dtype, has_valid, D, wide), "UPCAST": False}  # UPCAST off: what a GPU runs
    out = []
    for tuned, signature in (
        (FORWARD, {"X": t, "C": t, "VALID": "*i8", "LSE": "*fp32", "SCALE": "*fp32", **ints}),
        (ROWS, {"X": t, "C": t, "VALID": "*i8", "LSE": "*fp32", "G": "*fp32", "DX": t, "DS": "*fp32",
                "SCALE": "*fp32", **ints}),
        (COLS, {"X": t, "C": t, "VALID": "*i8", "LSE": "*fp32", "G": "*fp32", "DC": t, "SCALE": "*fp32",
                **ints}),
    ):
        kernel = tuned[_half(dtype)]
        for meta, launch in kernel.runnable(arch, const["BLOCK_D"], wide):
            out.append((kernel.fn, signature, {**const, **meta}, launch))
    return out


def lse_forward(rows, cols, col_valid, scale, out=None, config=None, n_splits=None, wide=None,
                options=tuning.DEFAULT):
    """(R,) log-sum-exp of each row. config: a shipped configuration's index
    (default: the autotuner's choice); n_splits: cut the columns into at most
    that many chunks (default: tuning.splits); wide: 64-bit offsets (default:
    when a tensor has 2^31 elements or more); options: tuning.Options."""
    rows, cols, valid = _prepare(rows, cols, col_valid)
    (R, D), NC = rows.shape, cols.shape[0]
    out = torch.empty(R, device=rows.device, dtype=torch.float32) if out is None else out
    if R == 0:  # a rank without samples: nothing to launch
        return out
    n, length = tuning.splits(R, NC, rows.device, n=n_splits, align=options.align)
    part = out[None] if n == 1 else tuning.partials(n, R, device=rows.device, options=options)
    dummy = valid if valid is not None else out  # never read when HAS_VALID is False
    FORWARD[_half(rows.dtype)](lambda m: (triton.cdiv(R, m["BLOCK_R"]), n), rows, cols, dummy, part, scale,
                               R, NC, D, length, device=rows.device, config=config, options=options,
                               **flags(rows.dtype, valid is not None, D, tuning.wide(wide, rows, cols)))
    if n > 1:
        torch.logsumexp(part, 0, out=out)
    return out


def lse_backward(rows, cols, col_valid, scale, lse, grad, d_rows=None, d_cols=None, config=None, n_splits=None,
                 wide=None, options=tuning.DEFAULT):
    """Gradients of sum_r grad_r lse_r: (d_rows, d_cols, d_scale). config,
    n_splits, wide and options as lse_forward (for both kernels)."""
    rows, cols, valid = _prepare(rows, cols, col_valid)
    (R, D), NC = rows.shape, cols.shape[0]
    grad = grad.float().contiguous()
    d_rows = torch.empty_like(rows) if d_rows is None else d_rows
    d_cols = torch.empty_like(cols) if d_cols is None else d_cols
    if R == 0 or NC == 0:  # no row or no column: every gradient is 0
        return d_rows.zero_(), d_cols.zero_(), torch.zeros((), device=rows.device)
    common = dict(device=rows.device, config=config, options=options)
    dummy = valid if valid is not None else lse
    # Row gradients (and the scale's, per row): the columns cut into chunks.
    n, length = tuning.splits(R, NC, rows.device, n=n_splits, align=options.align)
    dx = d_rows[None] if n == 1 else tuning.partials(n, R, D, device=rows.device, options=options)
    ds = tuning.partials(n, R, device=rows.device, options=options)
    ROWS[_half(rows.dtype)](lambda m: (triton.cdiv(R, m["BLOCK_R"]), n, triton.cdiv(D, m["BLOCK_DO"])),
                            rows, cols, dummy, lse, grad, dx, ds, scale, R, NC, D, length, **common,
                            **flags(rows.dtype, valid is not None, D, tuning.wide(wide, rows, cols, dx)))
    if n > 1:
        d_rows.copy_(dx.sum(0))
    # Column gradients: the rows cut into chunks.
    n, length = tuning.splits(NC, R, rows.device, n=n_splits, align=options.align)
    dc = d_cols[None] if n == 1 else tuning.partials(n, NC, D, device=rows.device, options=options)
    COLS[_half(rows.dtype)](lambda m: (triton.cdiv(NC, m["BLOCK_C"]), n, triton.cdiv(D, m["BLOCK_DO"])),
                            rows, cols, dummy, lse, grad, dc, scale, R, NC, D, length, **common,
                            **flags(rows.dtype, valid is not None, D, tuning.wide(wide, rows, cols, dc)))
    if n > 1:
        d_cols.copy_(dc.sum(0))
    return d_rows, d_cols, ds.sum()


class ColumnLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, col_valid, scale, options):
        scale32 = scale.detach().float().reshape(1).contiguous()
        lse = lse_forward(rows, cols, col_valid, scale32, options=options)
        ctx.save_for_backward(rows, cols, col_valid if col_valid is not None else lse.new_empty(0), scale32, lse)
        ctx.has_valid, ctx.options = col_valid is not None, options
        ctx.scale_shape, ctx.dtypes = scale.shape, (rows.dtype, cols.dtype, scale.dtype)
        return lse  # float32 whatever the inputs: a bf16 log-sum-exp would lose the loss

    @staticmethod
    def backward(ctx, grad):
        rows, cols, valid, scale32, lse = ctx.saved_tensors
        d_rows, d_cols, d_scale = lse_backward(rows, cols, valid if ctx.has_valid else None, scale32, lse, grad,
                                               options=ctx.options)
        # computed in the wider type (float32 for float64): hand back gradients of their own types
        rows_dtype, cols_dtype, scale_dtype = ctx.dtypes
        return (d_rows.to(rows_dtype), d_cols.to(cols_dtype), None,
                d_scale.to(scale_dtype).reshape(ctx.scale_shape), None)


def column_logsumexp(rows: torch.Tensor, cols: torch.Tensor, col_valid: torch.Tensor | None,
                     scale: torch.Tensor, *, options: tuning.Options = tuning.DEFAULT) -> torch.Tensor:
    """(R,) log-sum-exp of scale * rows @ cols.T over valid columns, fused
    (options: how the kernels launch, tuning.Options)."""
    return ColumnLogSumExp.apply(rows, cols, col_valid, scale, options)
