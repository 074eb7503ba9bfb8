"""Fused multi-positive contrastive log-sum-exp (docs/spec.md, section 4, kernel 1).

    lse[r] = log sum over valid columns c of exp(scale * rows[r] . cols[c])

Every term of the MAKE loss is `sum_r a_r lse_r - (positive logits)`, so this
is the only operation that touches rows x columns. The forward tiles the
columns and keeps an online log-sum-exp per row; the backward recomputes the
tiles: one kernel for the row gradients (and the scale's), one for the column
gradients. Nothing of size rows x columns is ever stored: extra memory is the
(R,) log-sum-exps and one partial sum per row block.

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

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32. IEEE: float32 operands, exact float32 products. Else
    bf16 operands on the tensor cores; UPCAST (the interpreter) multiplies the
    same bf16 values in float32 (see the module docstring)."""
    if IEEE or UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _logits(x, c, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """x (BR, BD) . c (BC, BD)^T in float32."""
    return _dot(x, tl.trans(c), IEEE, UPCAST)


@triton.jit
def _column_tile(C, VALID, cols, d, NC, D, HAS_VALID: tl.constexpr):
    """Columns `cols` (BC, BD) and which of them take part (BC,)."""
    c = tl.load(C + cols[:, None] * D + d[None, :], mask=(cols[:, None] < NC) & (d[None, :] < D), other=0.0)
    ok = cols < NC
    if HAS_VALID:
        ok = ok & (tl.load(VALID + cols, mask=cols < NC, other=0) != 0)
    return c, ok


@triton.jit
def _row_tile(X, LSE, G, rows, d, R, D):
    """Rows (BR, BD), their log-sum-exp and upstream gradient; a row without
    any valid column (lse = -inf) gets no gradient."""
    row_ok = rows < R
    x = tl.load(X + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    g = tl.where(lse == float("-inf"), 0.0, g)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    return x, lse, g


@triton.jit
def _lse_forward(X, C, VALID, LSE, SCALE, R, NC, D,
                 HAS_VALID: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    x = tl.load(X + rows[:, None] * D + d[None, :], mask=(rows[:, None] < R) & (d[None, :] < D), other=0.0)
    s = tl.load(SCALE).to(tl.float32)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, NC, BLOCK_C):
        c, ok = _column_tile(C, VALID, start + tl.arange(0, BLOCK_C), d, NC, D, HAS_VALID)
        logits = tl.where(ok[None, :], _logits(x, c, IEEE, UPCAST) * s, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid column yet
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        m = m_new
    lse = tl.where(total > 0, m + tl.log(total), float("-inf"))
    tl.store(LSE + rows, lse, mask=rows < R)


@triton.jit
def _lse_backward_rows(X, C, VALID, LSE, G, DX, DS, SCALE, R, NC, D,
                       HAS_VALID: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """dX[r] = s sum_c g_r p_rc cols_c;  DS[block] = sum_r g_r sum_c p_rc (rows_r . cols_c)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    x, lse, g = _row_tile(X, LSE, G, rows, d, R, D)
    s = tl.load(SCALE).to(tl.float32)
    dx = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    ds = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, NC, BLOCK_C):
        c, ok = _column_tile(C, VALID, start + tl.arange(0, BLOCK_C), d, NC, D, HAS_VALID)
        raw = _logits(x, c, IEEE, UPCAST)
        p = tl.where(ok[None, :], tl.exp(raw * s - lse[:, None]), 0.0)
        gp = g[:, None] * p
        dx += _dot(gp.to(c.dtype), c, IEEE, UPCAST)  # bf16 columns: the weights rounded to bf16 too
        ds += tl.sum(gp * raw, 1)
    tl.store(DX + rows[:, None] * D + d[None, :], (dx * s).to(DX.dtype.element_ty),
             mask=(rows[:, None] < R) & (d[None, :] < D))
    tl.store(DS + pid, tl.sum(ds, 0))


@triton.jit
def _lse_backward_cols(X, C, VALID, LSE, G, DC, SCALE, R, NC, D,
                       HAS_VALID: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """dC[c] = s sum_r g_r p_rc rows_r (0 for invalid columns)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    c, ok = _column_tile(C, VALID, cols, d, NC, D, HAS_VALID)
    s = tl.load(SCALE).to(tl.float32)
    dc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for start in range(0, R, BLOCK_R):
        x, lse, g = _row_tile(X, LSE, G, start + tl.arange(0, BLOCK_R), d, R, D)
        raw = _logits(x, c, IEEE, UPCAST)
        gp = g[:, None] * tl.where(ok[None, :], tl.exp(raw * s - lse[:, None]), 0.0)
        dc += _dot(tl.trans(gp).to(x.dtype), x, IEEE, UPCAST)
    tl.store(DC + cols[:, None] * D + d[None, :], (dc * s).to(DC.dtype.element_ty),
             mask=(cols[:, None] < NC) & (d[None, :] < D))


# ---------------------------------------------------------------------------
# Launchers (the `out` buffers let tests poison outputs and see each element written)


def _prepare(rows, cols, col_valid):
    """Rows and columns in one type, the wider of theirs (float64 computes in
    float32; bf16 or fp16 with float32 is float32: an exact widening)."""
    same_half = rows.dtype == cols.dtype and rows.dtype in (torch.bfloat16, torch.float16)
    dtype = rows.dtype if same_half else torch.float32
    valid = col_valid.to(torch.int8).contiguous() if col_valid is not None else None
    return rows.to(dtype).contiguous(), cols.to(dtype).contiguous(), valid


def launch_meta(dtype: torch.dtype, has_valid: bool, D: int, backward: bool = False) -> dict:
    """The constants and launch options of a kernel on `dtype` rows and columns
    (also what kernels/build.py compiles for a card it does not have). Chosen
    so that no build spills registers and every one fits an A100's shared
    memory (bench/kernels.py --compile-only; docs/BENCHMARKS.md):
    - bf16 and fp16 go through the tensor cores in 32 x 32 tiles; the backward
      kernels hold a 32 x D float32 gradient and spilled at 4 warps (255
      registers): they take 8;
    - float32 (exact products, no tensor cores) in 16 x 16 tiles and 2
      pipeline stages: 32 x 32 spilled 20 KB per thread and asked for 192 KB
      of shared memory at Triton's default 3 stages."""
    half = dtype in (torch.bfloat16, torch.float16)
    block = 32 if half else 16  # tl.dot needs each dimension >= 16
    return dict(HAS_VALID=has_valid, IEEE=dtype == torch.float32, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
                BLOCK_R=block, BLOCK_C=block, BLOCK_D=max(16, triton.next_power_of_2(D)),
                num_warps=8 if half and backward else 4, num_stages=3 if half else 2)


def builds(dtype: torch.dtype, D: int, has_valid: bool = True) -> list[tuple]:
    """(kernel, argument types, constants, options) of each kernel as the launchers
    run it on `dtype` rows and columns of width D."""
    t = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    ints = {"R": "i32", "NC": "i32", "D": "i32"}
    out = []
    for kernel, signature in (
        (_lse_forward, {"X": t, "C": t, "VALID": "*i8", "LSE": "*fp32", "SCALE": "*fp32", **ints}),
        (_lse_backward_rows, {"X": t, "C": t, "VALID": "*i8", "LSE": "*fp32", "G": "*fp32", "DX": t,
                              "DS": "*fp32", "SCALE": "*fp32", **ints}),
        (_lse_backward_cols, {"X": t, "C": t, "VALID": "*i8", "LSE": "*fp32", "G": "*fp32", "DC": t,
                              "SCALE": "*fp32", **ints}),
    ):
        meta = launch_meta(dtype, has_valid, D, backward=kernel is not _lse_forward)
        options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        out.append((kernel, signature, {**meta, "UPCAST": False}, options))  # UPCAST off: what a GPU runs
    return out


def lse_forward(rows, cols, col_valid, scale, out=None):
    rows, cols, valid = _prepare(rows, cols, col_valid)
    R, D = rows.shape
    out = torch.empty(R, device=rows.device, dtype=torch.float32) if out is None else out
    if R == 0:  # a rank without samples: nothing to launch
        return out
    dummy = valid if valid is not None else out  # never read when HAS_VALID is False
    meta = launch_meta(rows.dtype, valid is not None, D)
    _lse_forward[(triton.cdiv(R, meta["BLOCK_R"]),)](rows, cols, dummy, out, scale, R, cols.shape[0], D, **meta)
    return out


def lse_backward(rows, cols, col_valid, scale, lse, grad, d_rows=None, d_cols=None, d_scale_parts=None):
    """Gradients of sum_r grad_r lse_r: (d_rows, d_cols, d_scale)."""
    rows, cols, valid = _prepare(rows, cols, col_valid)
    (R, D), NC = rows.shape, cols.shape[0]
    grad = grad.float().contiguous()
    d_rows = torch.empty_like(rows) if d_rows is None else d_rows
    d_cols = torch.empty_like(cols) if d_cols is None else d_cols
    meta = launch_meta(rows.dtype, valid is not None, D, backward=True)
    blocks = triton.cdiv(R, meta["BLOCK_R"])
    parts = torch.empty(blocks, device=rows.device, dtype=torch.float32) if d_scale_parts is None else d_scale_parts
    if R == 0 or NC == 0:  # no row or no column: every gradient is 0
        return d_rows.zero_(), d_cols.zero_(), parts.zero_().sum()
    dummy = valid if valid is not None else lse
    _lse_backward_rows[(blocks,)](rows, cols, dummy, lse, grad, d_rows, parts, scale, R, NC, D, **meta)
    _lse_backward_cols[(triton.cdiv(NC, meta["BLOCK_C"]),)](rows, cols, dummy, lse, grad, d_cols, scale, R, NC, D,
                                                             **meta)
    return d_rows, d_cols, parts.sum()


class ColumnLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, col_valid, scale):
        scale32 = scale.detach().float().reshape(1).contiguous()
        lse = lse_forward(rows, cols, col_valid, scale32)
        ctx.save_for_backward(rows, cols, col_valid if col_valid is not None else lse.new_empty(0), scale32, lse)
        ctx.has_valid = col_valid is not None
        ctx.scale_shape, ctx.dtypes = scale.shape, (rows.dtype, cols.dtype, scale.dtype)
        return lse  # float32 whatever the inputs: a bf16 log-sum-exp would lose the loss

    @staticmethod
    def backward(ctx, grad):
        rows, cols, valid, scale32, lse = ctx.saved_tensors
        d_rows, d_cols, d_scale = lse_backward(rows, cols, valid if ctx.has_valid else None, scale32, lse, grad)
        # computed in the wider type (float32 for float64): hand back gradients of their own types
        rows_dtype, cols_dtype, scale_dtype = ctx.dtypes
        return (d_rows.to(rows_dtype), d_cols.to(cols_dtype), None,
                d_scale.to(scale_dtype).reshape(ctx.scale_shape))


def column_logsumexp(rows: torch.Tensor, cols: torch.Tensor, col_valid: torch.Tensor | None,
                     scale: torch.Tensor) -> torch.Tensor:
    """(R,) log-sum-exp of scale * rows @ cols.T over valid columns, fused."""
    return ColumnLogSumExp.apply(rows, cols, col_valid, scale)
