"""The MAKE objective's hot part on the Triton kernels against the dense torch path.

GPU host (needs only torch and triton, both there):

    python bench/kernels.py --out $OUT/kernels.md

CPU smoke run of the same code under Triton's interpreter (tiny sizes):

    TRITON_INTERPRET=1 .venv/bin/python bench/kernels.py --small

Any machine, no GPU: what each kernel build (every shipped configuration) costs on sm_80 and sm_90
(registers, spills, shared memory; kernels/build.py, installed as make_dist_kernels):

    .venv/bin/python bench/kernels.py --compile-only --json resources.json
    .venv/bin/python bench/kernels.py --compile-only --wide       # the 64-bit builds
    .venv/bin/python bench/kernels.py --compare A.json B.json     # one table of runs under several Tritons

(bash bench/tritons.sh does the last for Triton 3.6-3.9.)

What it does, at local batch B = 2048, N = 11 slots, D = 512, P = 196 patches:
1. correctness at real size: the loss numerators and every input gradient of
   the kernels (fp32 and bf16 inputs) against the dense path in fp32;
2. time (median of --repeats CUDA-event timings) and extra memory (peak
   beyond inputs and gradients) of forward + backward of
   `contrastive_numerators`, with the columns of 1, 8 and 32 ranks (the other
   ranks' columns random), for dense fp32 (the baseline), kernels bf16 and fp32;
3. similarity-weighted patch pooling forward + backward in bf16;
4. the configurations the autotuner chose;
5. the kernels on tensors past 2^31 elements (64-bit offsets), against the dense path.
Targets (issue "Kernels", on an H100): loss <= 1.5 ms at 1 rank and <= 15 ms at
32 ranks with extra memory <= 64 MB; pooling <= 0.6 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from make_dist import objective
from make_dist.objective import Columns, aspect_weights, contrastive_numerators


def realistic_mask(B: int, N: int, g: torch.Generator) -> torch.Tensor:
    """Slot 0 always; disease text missing 15%, concept text 10%; 1 to N-3 subtexts."""
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, 0] = True
    mask[:, 1] = torch.rand(B, generator=g) > 0.15
    mask[:, 2] = torch.rand(B, generator=g) > 0.10
    n_sub = torch.randint(1, N - 2, (B,), generator=g)
    mask[:, 3:] = torch.arange(N - 3)[None, :] < n_sub[:, None]
    return mask


class Problem:
    """One rank's embeddings and the columns of `ranks - 1` other ranks."""

    def __init__(self, B, N, D, P, ranks, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)  # noqa: E731
        self.image, self.texts, self.patches = unit(B, D), unit(B, N, D), unit(B, P, D)
        self.mask = realistic_mask(B, N, g).to(device)
        self.scale = torch.tensor([30.0], device=device)
        others = ranks - 1
        self.other_images, self.other_texts = unit(others * B, D), unit(others * B * N, D)
        self.other_valid = realistic_mask(others * B, N, g).reshape(-1).to(device)
        self.other_knowledge = unit(others * B, D)


def loss_and_grads(ops, pb: Problem, dtype, backward=True):
    """What MakeLoss runs on one rank, with the other ranks' columns given."""
    image, texts, patches = (x.to(dtype, copy=True).requires_grad_() for x in (pb.image, pb.texts, pb.patches))
    scale = pb.scale.clone().requires_grad_()
    acc = torch.float32
    s = scale.reshape(())
    mask = pb.mask
    weights = aspect_weights(texts, mask)
    w_mkcl, w_slra = weights, weights[:, 3:]
    knowledge = ops.knowledge_embedding(patches, texts[:, 0], 0.0).to(acc)
    cat = lambda local, other: torch.cat([local, other.to(local.dtype)])  # noqa: E731
    cols = Columns(
        images=cat(image, pb.other_images),
        texts=cat(texts.flatten(0, 1), pb.other_texts),
        text_valid=torch.cat([mask.reshape(-1), pb.other_valid]),
        knowledge=cat(knowledge, pb.other_knowledge),  # float32, as MakeLoss keeps it
    )
    numerators = contrastive_numerators(ops, image, texts, knowledge, w_mkcl, w_slra, cols, s)
    loss = (numerators / torch.stack([w_mkcl.sum(), w_mkcl.sum(), w_slra.sum()])).sum()
    if not backward:
        return loss
    loss.backward()
    return numerators.detach(), [x.grad for x in (image, texts, patches, scale)]


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def cuda_time(fn, repeats: int) -> float:
    """Median milliseconds of fn() (with a synchronising wall clock off CUDA)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extra_memory_mb(fn) -> float:
    """Peak allocation during fn() beyond what was allocated before and what it returns."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before  # gradients and outputs it returned
    extra = torch.cuda.max_memory_allocated() - before - kept
    del result
    return extra / 2**20


def config_label(config: dict) -> str:
    """Tiles, warps, stages of a build: 'R64 C64 K64 DO256 w8 s3'."""
    short = {"BLOCK_R": "R", "BLOCK_C": "C", "BLOCK_K": "K", "BLOCK_DO": "DO", "BLOCK_P": "P"}
    tiles = " ".join(f"{v}{config[k]}" for k, v in short.items() if k in config)
    return f"{tiles} w{config['num_warps']} s{config['num_stages']}" + (" 64-bit" if config.get("WIDE") else "")


def _compile_one(job: tuple[int, str, bool, int]) -> dict:
    """Compile build `index` of (target, input type, 64-bit offsets): a worker's job
    (a build itself does not pickle: each worker lists the builds again)."""
    from make_dist_kernels.build import all_builds, resources

    arch, dtype, wide, index = job
    _, _, build = all_builds(arch, dtypes=(dtype,), wide=wide)[index]
    start = time.perf_counter()
    return {**resources(build, arch), "dtype": dtype, "compile_s": round(time.perf_counter() - start, 1)}


def compile_table(builds: list[tuple[int, str]], json_path: str | None, out: str | None, wide: bool = False) -> None:
    """Every kernel as the launchers run it (D = 512), for each (target, input type),
    in each configuration the autotuner may pick (the first: the default), or
    with 64-bit offsets (wide) in the first; compiled in one process per core."""
    import json
    import multiprocessing

    from make_dist_kernels.build import all_builds

    jobs = [(arch, dtype, wide, i) for arch, dtype in builds
            for i in range(len(all_builds(arch, dtypes=(dtype,), wide=wide)))]
    lines = ["| kernel | target | dtype | config | registers | spill bytes | shared KB | fits | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    print(lines[0] + "\n" + lines[1], flush=True)
    records = []
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        for r in pool.imap(_compile_one, jobs):  # in order, each printed as it comes
            records.append(r)
            lines.append(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {config_label(r['config'])} | "
                         f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                         f"{'yes' if r['shared_fits'] else 'NO'} | {r['compile_s']} |")
            print(lines[-1], flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1, default=str)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")


def compare_tables(paths: list[str], out: str | None) -> int:
    """One row per build of several --compile-only records (one file per Triton,
    bench/tritons.sh): registers / spill bytes / shared KB under each Triton,
    and whether every one of them is spill-free and fits the card. Returns the
    number of builds that are not."""
    import json

    runs = [json.load(open(p)) for p in paths]
    versions = [run[0]["triton"] if run else p for run, p in zip(runs, paths)]
    rows: dict[tuple, list] = {}
    for i, run in enumerate(runs):
        for r in run:
            key = (r["kernel"], r["target"], r["dtype"], config_label(r["config"]))
            rows.setdefault(key, [None] * len(runs))[i] = r
    lines = ["| kernel | target | dtype | config | " + " | ".join(f"triton {v}" for v in versions) + " | lean |",
             "|---|---|---|---|" + "---|" * (len(runs) + 1)]
    bad = 0
    for key, records in rows.items():
        lean = all(r is not None and r["spill_bytes"] == 0 and r["shared_fits"] for r in records)
        bad += not lean
        cells = [f"{r['registers']} / {r['spill_bytes']} / {r['shared_bytes'] / 1024:.0f}" if r else "not built"
                 for r in records]
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + f" | {'yes' if lean else 'NO'} |")
    lines += ["", "registers / spill bytes / shared KB per build; lean: spill-free and within the card's "
              f"shared memory under every Triton. {bad} of {len(rows)} builds not lean."]
    print("\n".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny sizes, for a CPU run under TRITON_INTERPRET=1")
    p.add_argument("--ranks", default="1,8,32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", help="also write the report (markdown) here")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU needed: compile every kernel in every shipped configuration for --builds "
                        "and print registers, spills and shared memory (kernels/build.py)")
    p.add_argument("--builds", default="80:bf16,80:fp32,90:bf16,90:fp32",
                   help="compute capability:input type pairs to compile for")
    p.add_argument("--json", help="with --compile-only: also write the records here")
    p.add_argument("--wide", action="store_true",
                   help="with --compile-only: the builds with 64-bit offsets (each kernel's first configuration, "
                        "what a launch past 2^31 elements runs)")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="no GPU, no compiling: one table of several --compile-only --json files (one per Triton, "
                        "bench/tritons.sh); exits 1 if a build spills or overflows under any")
    args = p.parse_args()
    if args.compare:
        sys.exit(1 if compare_tables(args.compare, args.out) else 0)
    if args.compile_only:
        return compile_table([(int(b.split(":")[0]), b.split(":")[1]) for b in args.builds.split(",")],
                             args.json, args.out, wide=args.wide)
    import make_dist_kernels as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.small:
        B, N, D, P, ranks, args.repeats = 8, 5, 16, 10, [1, 2], 2
    else:
        B, N, D, P, ranks = 2048, 11, 512, 196, [int(r) for r in args.ranks.split(",")]
    dense = objective._TorchOps
    lines = [f"# bench/kernels.py on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}",
             f"B={B} N={N} D={D} P={P}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", ""]

    # 1. correctness at this size
    pb = Problem(B, N, D, P, max(ranks), device)
    want_num, want_grads = loss_and_grads(dense, pb, torch.float32)
    lines += ["| check | rel. error numerators | image grad | texts grad | patches grad | scale grad |",
              "|---|---|---|---|---|---|"]
    for name, dtype in (("kernels fp32 vs dense fp32", torch.float32), ("kernels bf16 vs dense fp32", torch.bfloat16)):
        num, grads = loss_and_grads(kernels, pb, dtype)
        errs = [rel_err(num, want_num)] + [rel_err(a, b) for a, b in zip(grads, want_grads)]
        lines.append(f"| {name} ({max(ranks)} ranks' columns) | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    del pb

    # 2. speed and memory of the loss
    lines += ["", "| ranks' columns | dense fp32 ms | kernels bf16 ms | kernels fp32 ms | speed-up bf16 | "
              "extra MB dense | extra MB kernels bf16 |", "|---|---|---|---|---|---|---|"]
    for G in ranks:
        pb = Problem(B, N, D, P, G, device, seed=G)
        run = lambda ops, dtype: (lambda: loss_and_grads(ops, pb, dtype))  # noqa: E731
        t_dense = cuda_time(run(dense, torch.float32), args.repeats)
        t_bf16 = cuda_time(run(kernels, torch.bfloat16), args.repeats)
        t_fp32 = cuda_time(run(kernels, torch.float32), args.repeats)
        m_dense = extra_memory_mb(run(dense, torch.float32))
        m_bf16 = extra_memory_mb(run(kernels, torch.bfloat16))
        lines.append(f"| {G} | {t_dense:.2f} | {t_bf16:.2f} | {t_fp32:.2f} | {t_dense / t_bf16:.1f}x | "
                     f"{m_dense:.0f} | {m_bf16:.0f} |")
        del pb
        if device == "cuda":
            torch.cuda.empty_cache()

    # 3. patch pooling, bf16
    g = torch.Generator().manual_seed(1)
    patches = F.normalize(torch.randn(B, P, D, generator=g), dim=-1).to(device, torch.bfloat16).requires_grad_()
    text = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device, torch.bfloat16).requires_grad_()
    upstream = torch.randn(B, D, generator=g).to(device)

    def pool(ops):
        def step():
            patches.grad = text.grad = None
            (ops.knowledge_embedding(patches, text, 0.0).float() * upstream).sum().backward()
        return step

    t_pool_dense, t_pool = cuda_time(pool(dense), args.repeats), cuda_time(pool(kernels), args.repeats)
    moved = 3 * patches.numel() * patches.element_size()  # read twice, gradient written once
    lines += ["", "| patch pooling fwd+bwd, bf16 | ms | GB/s (3 passes over the patches) |", "|---|---|---|",
              f"| dense torch | {t_pool_dense:.3f} | {moved / t_pool_dense / 1e6:.0f} |",
              f"| kernel | {t_pool:.3f} | {moved / t_pool / 1e6:.0f} |",
              f"| speed-up | {t_pool_dense / t_pool:.1f}x | |"]

    # 4. what the autotuner chose for each kernel and shape (kernels/tuning.py)
    from make_dist_kernels import contrastive, pooling

    lines += ["", "Configurations the autotuner chose (kernel: target, padded D, shape key -> config):"]
    for tuned in [*contrastive.FORWARD.values(), *contrastive.ROWS.values(), *contrastive.COLS.values(),
                  pooling.FORWARD, pooling.BACKWARD]:
        lines += [f"- {tuned.fn.__name__}: {choice}" for choice in tuned.chosen()]

    write_report(lines, args.out)
    if device == "cuda" and not args.small:  # last: what came before is written already
        try:
            lines += ["", *past_int32(D, P)]
        except Exception as e:  # a failure here is a finding to report, not a reason to lose the rest
            lines += ["", f"past 2^31 elements: FAILED ({type(e).__name__}: {e})"]
        write_report(lines, args.out)


def write_report(lines: list[str], out: str | None) -> None:
    report = "\n".join(lines)
    print(report, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(report + "\n")


def past_int32(D: int, P: int, tail: int = 4096, device: str = "cuda", elements: int = 2**31) -> list[str]:
    """Kernels on tensors of more than 2^31 elements (their offsets need 64 bits): the
    columns of some 200 ranks, and a batch of patches that large, in bf16, against
    the dense path in float32 on what lies past 2^31 (all of the log-sum-exps and
    row gradients, the last `tail` columns' gradients, the last 8 images).
    device, elements: a smaller dry run (elements in place of 2^31, wide forced)."""
    import make_dist_kernels as kernels

    g = torch.Generator(device=device).manual_seed(5)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, device=device), dim=-1).bfloat16()  # noqa: E731
    R, NC = 128, elements // D + 2 * tail
    rows, cols = unit(R, D).requires_grad_(), unit(NC, D).requires_grad_()
    s, upstream = torch.tensor(30.0, device=device), torch.randn(R, generator=g, device=device)
    assert elements < 2**31 or kernels.tuning.wide(None, cols)
    lse = kernels.column_logsumexp(rows, cols, None, s)
    lse.backward(upstream)
    # dense, a million columns at a time
    x, chunks = rows.detach().float(), [cols.detach()[i:i + 2**20].float() for i in range(0, NC, 2**20)]
    want = torch.logsumexp(torch.cat([torch.logsumexp(s * x @ c.T, 1, keepdim=True) for c in chunks], 1), 1)
    weights = lambda c: upstream[:, None] * torch.exp(s * x @ c.T - want[:, None])  # noqa: E731  (R, len(c))
    d_rows = s * sum(weights(c) @ c for c in chunks)
    d_last = s * weights(chunks[-1][-tail:]).T @ x
    del chunks
    out = [f"Past 2^31 elements (bf16 vs dense float32): {NC:,} columns x {D} = {NC * D:,} elements",
           "| check | rel. error |", "|---|---|",
           f"| log-sum-exp of {R} rows | {rel_err(lse, want):.1e} |",
           f"| row gradients | {rel_err(rows.grad, d_rows):.1e} |",
           f"| gradients of the last {tail} columns | {rel_err(cols.grad[-tail:], d_last):.1e} |"]
    del rows, cols, lse
    torch.cuda.empty_cache()
    B = elements // (P * D) + 8
    patches, text = unit(B, P, D).requires_grad_(), unit(B, D).requires_grad_()
    upstream = torch.randn(B, D, generator=g, device=device)
    e = kernels.knowledge_embedding(patches, text, 0.0)
    (e * upstream).sum().backward()
    p8, t8 = patches.detach()[-8:].float().requires_grad_(), text.detach()[-8:].float().requires_grad_()
    e8 = objective.knowledge_embedding(p8, t8, 0.0)
    (e8 * upstream[-8:]).sum().backward()
    out += [f"| pooling, {B:,} x {P} x {D} patches: the last 8 images' embeddings | {rel_err(e[-8:], e8):.1e} |",
            f"| their patch gradients | {rel_err(patches.grad[-8:], p8.grad):.1e} |",
            f"| their text gradients | {rel_err(text.grad[-8:], t8.grad):.1e} |"]
    return out


if __name__ == "__main__":
    main()
