"""The MAKE objective (docs/spec.md, section 3): one module, read top to bottom.

    L = L_mkcl + lam * L_slra

`MakeLoss` is built once from a config's `loss` section (as open_clip's
ClipLoss) and called on the embeddings of one rank's local batch (all
L2-normalised):

    image    (B, D)      pooled image embedding v
    patches  (B, P, D)   projected patch tokens p
    texts    (B, N, D)   slot 0 raw caption, 1 disease aspect, 2 concept aspect,
                         3.. subtexts (sentences of the caption); make_dist/slots.py
    mask     (B, N)      True where slot n of sample b holds a text
    scale    () or (1,)  s = exp(logit_scale), already clamped

Data parallel. With torch.distributed initialised and world size G > 1, every
rank computes the terms of its own rows against the columns gathered from all
ranks (make_dist/distributed.py). Ranks may hold different numbers of samples
(a short last batch, a skipped corrupt sample), none included. The value
returned on every rank is the loss of the concatenated global batch. The
backward carries G times this rank's share of the global gradient, because
data-parallel engines (DDP, DeepSpeed) *average* gradients over ranks: after
that average every parameter receives exactly the gradient of the
single-process loss on the global batch, whatever each rank held.

Precision. bf16 embeddings are used as they are (their products are exact
in float32) and everything accumulates in float32. The knowledge-enhanced
embeddings are made in float32 and stay float32 everywhere, gathered and
local, so each term's log-sum-exp and its positive logit read one and the
same value of every embedding.

Nothing here loops over samples or captions: the whole objective is a
handful of batched matmuls. Nothing reads a value back to the host either,
except the per-rank batch sizes when the caller does not pass them
(`rows_per_rank`; the trainer does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import BACKENDS, LossConfig
from .distributed import batch_sizes, gather_rows, sum_detached, world_size
from .slots import DISEASE, FIRST_SUBTEXT, RAW, in_mkcl, read_by_loss


class MakeLoss:
    """The MAKE loss terms ``total``, ``mkcl``, ``i2t``, ``t2i``, ``slra`` of a batch.

    Switches (ablations, Table 3 of the paper): ``mkcl_subtexts`` off drops
    slots 3.. from L_mkcl (as positives and as negatives), ``mkcl_aspects``
    off drops slots 1 and 2 from it likewise, ``slra`` off sets lambda to 0
    (and ``slra`` reports 0), ``dkw`` off gives every valid text weight 1.
    Everything off is CLIP's loss on the raw captions. ``backend``: "torch"
    (dense), "triton" (the fused kernels) or "auto" (the kernels on CUDA).
    """

    def __init__(self, lam: float = 0.7, sigma: float = 0.0, *, dkw: bool = True, slra: bool = True,
                 mkcl_subtexts: bool = True, mkcl_aspects: bool = True, backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"MakeLoss: backend {backend!r} is not available; choose one of {BACKENDS}")
        self.lam, self.sigma, self.backend = lam, sigma, backend
        self.dkw, self.slra, self.mkcl_subtexts, self.mkcl_aspects = dkw, slra, mkcl_subtexts, mkcl_aspects

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "MakeLoss":
        return cls(cfg.lam, cfg.sigma, dkw=cfg.dkw, slra=cfg.slra, mkcl_subtexts=cfg.mkcl_subtexts,
                   mkcl_aspects=cfg.mkcl_aspects, backend=cfg.backend)

    def slots_read(self, n: int) -> list[bool]:
        """The slots this loss reads: a trainer can leave the others untokenised."""
        return read_by_loss(n, dkw=self.dkw, slra=self.slra, mkcl_subtexts=self.mkcl_subtexts,
                            mkcl_aspects=self.mkcl_aspects)

    def __call__(self, image: torch.Tensor, patches: torch.Tensor, texts: torch.Tensor, mask: torch.Tensor,
                 scale: torch.Tensor, rows_per_rank: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``rows_per_rank``: every rank's local batch size, in rank order, when
        the caller knows them (None: exchanged here, read back to the host)."""
        _check_shapes(image, patches, texts, mask, scale)
        ops = _ops(self.backend, image)
        acc = torch.promote_types(image.dtype, torch.float32)  # accumulate in >= fp32
        if ops is _TorchOps:  # the dense path computes in that type; the kernels take bf16 as it is
            image, patches, texts = image.to(acc), patches.to(acc), texts.to(acc)
        s = scale.to(acc).reshape(())
        mask = mask.bool()
        # A missing slot holds no text: zero it so nothing it contains can leak in.
        texts = texts.masked_fill(~mask[..., None], 0.0)

        weights = aspect_weights(texts, mask, dkw=self.dkw)  # (B, N), detached, 0 where missing
        scored = mask & torch.tensor(in_mkcl(mask.shape[1], mkcl_subtexts=self.mkcl_subtexts,
                                             mkcl_aspects=self.mkcl_aspects), device=mask.device)
        w_mkcl = weights * scored
        w_slra = weights[:, FIRST_SUBTEXT:]
        # float32 from both backends, and kept so: gathered and local alike (module docstring).
        knowledge = ops.knowledge_embedding(patches, texts[:, RAW], self.sigma).to(acc) if self.slra else None

        sizes = batch_sizes(image.shape[0], image.device, rows_per_rank)
        cols = gather_columns(image, texts, scored, knowledge, sizes)
        den = sum_detached(torch.stack([w_mkcl.sum(), w_slra.sum()]))

        numerators = contrastive_numerators(ops, image, texts, knowledge, w_mkcl, w_slra, cols, s)

        i2t, t2i, slra_term = _global_mean(numerators, den[[0, 0, 1]]).unbind()
        mkcl = (i2t + t2i) / 2
        total = mkcl + self.lam * slra_term if self.slra else mkcl
        return {"total": total, "mkcl": mkcl, "i2t": i2t, "t2i": t2i, "slra": slra_term}


# ---------------------------------------------------------------------------
# The pieces of the objective


def contrastive_numerators(ops, image, texts, knowledge, w_mkcl, w_slra, cols, s) -> torch.Tensor:
    """The weighted sums of Eq. 3, 4 and 6 over this rank's rows, against the
    global columns: (3,) numerators of L_i2t, L_t2i, L_slra. This is the part
    whose cost grows with the number of ranks (bench/kernels.py times it)."""
    acc = s.dtype
    # s * v_b . t_bn: the positive logit of every (image, own text) pair.
    positive = s * torch.einsum("bd,bnd->bn", image.to(acc), texts.to(acc))

    # L_i2t: every positive of image b shares its one row denominator LSE_b.
    lse_image = ops.column_logsumexp(image, cols.texts, cols.text_valid, s)  # (B,)
    i2t = (w_mkcl.sum(1) * lse_image).sum() - (w_mkcl * positive).sum()

    # L_t2i: each text against all global images.
    lse_text = ops.column_logsumexp(texts.flatten(0, 1), cols.images, None, s)  # (B*N,)
    t2i = (w_mkcl.flatten() * lse_text).sum() - (w_mkcl * positive).sum()

    # L_slra: each subtext against the knowledge-enhanced embedding of every image.
    if knowledge is not None and texts.shape[1] > FIRST_SUBTEXT:
        sub = texts[:, FIRST_SUBTEXT:]
        lse_sub = ops.column_logsumexp(sub.flatten(0, 1), cols.knowledge, None, s)
        sub_positive = s * torch.einsum("bd,bnd->bn", knowledge, sub.to(acc))
        slra = (w_slra.flatten() * lse_sub).sum() - (w_slra * sub_positive).sum()
    else:
        slra = positive.new_zeros(())
    return torch.stack([i2t, t2i, slra])


def aspect_weights(texts: torch.Tensor, mask: torch.Tensor, *, dkw: bool = True) -> torch.Tensor:
    """Diagnosis-guided weights w (B, N), Eq. 7, detached.

    Slots 0-2 weigh 1; subtext n weighs exp(c_bn - max_n' c_bn') with
    c_bn = t_b1 . t_bn (the most relevant subtext gets 1). Without a disease
    text, or with dkw off, every subtext weighs 1. Missing slots weigh 0.
    """
    texts = texts.detach().to(torch.promote_types(texts.dtype, torch.float32))
    valid = mask.to(texts.dtype)
    if not dkw or texts.shape[1] <= FIRST_SUBTEXT:
        return valid
    sub_valid = mask[:, FIRST_SUBTEXT:]
    c = torch.einsum("bd,bnd->bn", texts[:, DISEASE], texts[:, FIRST_SUBTEXT:])
    c = c.masked_fill(~sub_valid, float("-inf"))
    c_max = c.amax(1, keepdim=True)
    # Rows with no valid subtext have c_max = -inf: their weights are 0 anyway.
    w_sub = torch.where(sub_valid, torch.exp(c - c_max.clamp_min(-1e4)), 0.0)
    has_disease = mask[:, DISEASE : DISEASE + 1]
    w_sub = torch.where(has_disease, w_sub, sub_valid.to(texts.dtype))
    return torch.cat([valid[:, :FIRST_SUBTEXT], w_sub], 1)


def knowledge_embedding(patches: torch.Tensor, raw_text: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """Knowledge-enhanced visual embedding e_b (B, D), Eq. 5, one per image.

    z_bq = r_bq [r_bq >= sigma], r_bq = t_b0 . p_bq; e_b = normalise(sum_q z_bq p_bq),
    the zero vector when every z_bq is 0. The paper's division by sum z is a
    positive rescaling that the cosine of Eq. 6 removes.
    """
    r = torch.einsum("bpd,bd->bp", patches, raw_text)
    z = torch.where(r >= sigma, r, torch.zeros_like(r))
    pooled = torch.einsum("bp,bpd->bd", z, patches)
    # F.normalize divides by max(norm, eps): a zero vector stays zero, finite grads.
    return F.normalize(pooled, dim=-1, eps=1e-12)


def column_logsumexp(
    rows: torch.Tensor, cols: torch.Tensor, col_valid: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """LSE_r = log sum over valid columns c of exp(scale * rows_r . cols_c), (R,).

    The dense path: materialises the R x C logits once. This is the operation
    the fused kernel (docs/spec.md, section 4) computes tile by tile.
    """
    logits = scale * rows @ cols.T
    if col_valid is not None:
        logits = logits.masked_fill(~col_valid, float("-inf"))
    return torch.logsumexp(logits, dim=1)


class _TorchOps:
    """The dense path: the definition the kernels are checked against."""

    column_logsumexp = staticmethod(column_logsumexp)
    knowledge_embedding = staticmethod(knowledge_embedding)


def _ops(backend: str, like: torch.Tensor):
    """The implementation of the two hot operations: torch, or the Triton
    kernels (on a CUDA device, or anywhere under TRITON_INTERPRET=1)."""
    if backend == "auto":
        backend = "triton" if like.is_cuda and _triton_ok() else "torch"
    if backend == "torch":
        return _TorchOps
    if not like.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("MakeLoss: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    import make_dist_kernels  # only when asked for: importing it builds the kernels for the interpreter or the GPU

    return make_dist_kernels


def _triton_ok() -> bool:
    """Whether make-dist's kernels (kernels/, installed as make_dist_kernels) import here."""
    try:
        import make_dist_kernels  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------
# Data parallel


class Columns:
    """The columns every rank scores its rows against, gathered from all ranks."""

    def __init__(self, images, texts, text_valid, knowledge):
        self.images = images  # (sum B, D)
        self.texts = texts  # (sum B * N, D)
        self.text_valid = text_valid  # (sum B * N,) bool
        self.knowledge = knowledge  # (sum B, D) float32, or None


def gather_columns(image, texts, text_valid, knowledge, rows_per_rank: Sequence[int]) -> Columns:
    """Images, texts, validity and knowledge embeddings of every rank, with
    gradient, in rank order (the knowledge embeddings travel in float32
    beside bf16 embeddings)."""
    B, N, D = texts.shape
    parts = {"images": image, "texts": texts.flatten(1), "valid": text_valid.to(image.dtype)}
    if knowledge is not None:
        parts["knowledge"] = knowledge
    parts = gather_rows(parts, rows_per_rank)
    return Columns(
        images=parts["images"],
        texts=parts["texts"].reshape(-1, D),
        text_valid=parts["valid"].reshape(-1).detach() > 0.5,
        knowledge=parts.get("knowledge"),
    )


def _global_mean(numerators: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """Global weighted means whose value is the global loss on every rank and
    whose gradient is G times this rank's share (see the module docstring)."""
    share = numerators / denominators.clamp_min(torch.finfo(denominators.dtype).tiny)
    world = world_size()
    if world == 1:
        return share
    value = sum_detached(share)
    return world * share + (value - world * share).detach()


def _check_shapes(image, patches, texts, mask, scale) -> None:
    B, D = image.shape
    if patches.ndim != 3 or patches.shape[0] != B or patches.shape[2] != D:
        raise ValueError(f"MakeLoss: patches must be (B={B}, P, D={D}), got {tuple(patches.shape)}")
    if texts.ndim != 3 or texts.shape[0] != B or texts.shape[2] != D:
        raise ValueError(f"MakeLoss: texts must be (B={B}, N, D={D}), got {tuple(texts.shape)}")
    if tuple(mask.shape) != tuple(texts.shape[:2]):
        raise ValueError(f"MakeLoss: mask must be (B, N)={tuple(texts.shape[:2])}, got {tuple(mask.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"MakeLoss: scale must hold one value, got shape {tuple(scale.shape)}")
