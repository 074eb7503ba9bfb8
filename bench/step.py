"""The full training step on one GPU: make-dist's step against the straightforward one.

GPU host (torch and triton are there; the rest travels as the wheelhouse
that `make wheelhouse` builds, docs/gpu-hosts.md); bench/gpu.sh installs it
and runs this and bench/kernels.py in one call:

    python3 bench/step.py --out $OUT

FLOP counts per sample on any machine: `.venv/bin/python bench/step.py --flops`.

CPU smoke run of the same code (tiny model, a few steps, kernels interpreted):

    TRITON_INTERPRET=1 .venv/bin/python bench/step.py --small

1. Data: a synthetic set (N = K + 3 = 11 slots, the generator's mix of
   missing aspect texts, 1-8 sentences and caption lengths) written as
   WebDataset shards, read through the trainer's own loader into pinned host
   memory (--batches batches of each size, cycled).
2. Every variant builds the trainer's engine from configs/paper.yaml (the
   paper's ViT-B/16 QuickGELU + text transformer, DeepSpeed ZeRO-2, bf16) with
   a few keys changed, from the same seed, and runs the trainer's own step
   (`Trainer.step` on `prefetch`ed batches, as `make-dist train` does): --warmup
   steps, then --steps timed ones. Reported: samples/s, peak GPU memory
   (allocated), model FLOPs utilisation (make_dist.model's `train_flops` of
   the batches over the card's peak bf16 rate), and the loss of the first
   step, taken by every variant on the same batch from the same weights: a
   lever that changed the objective would show there.
3. --loader (the default on a GPU): the loader alone on the host's cores,
   then make-dist's step fed by it live.
Results go to OUT/step.md (a table, rewritten after every variant, so a run
cut short keeps what it measured) and OUT/step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/

import torch  # noqa: E402

from make_dist.config import load_config  # noqa: E402
from make_dist.data.schema import load_column_map  # noqa: E402
from make_dist.data.shards import write_shards  # noqa: E402
from make_dist.data.stream import Batch, make_loader  # noqa: E402
from make_dist.data.synth import synthesize  # noqa: E402
from make_dist.files import write_atomic  # noqa: E402
from make_dist.model import build_model, tokenizer  # noqa: E402
from make_dist.objective import MakeLoss  # noqa: E402
from make_dist.progress import say  # noqa: E402
from make_dist.slots import n_slots  # noqa: E402
from make_dist.train import engine as ds  # noqa: E402
from make_dist.train.prefetch import prefetch  # noqa: E402
from make_dist.train.trainer import Trainer  # noqa: E402

# Peak dense bf16 tensor-core rates (vendor figures), for MFU; matched in order.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)]

# The straightforward correct step (the reference figures of docs/BENCHMARKS.md):
# every slot encoded at the full context, the dense loss, checkpointing, AdamW unfused.
BASELINE = {"model.text_batching": "full", "loss.backend": "torch", "model.grad_checkpointing": True,
            "optim.fused": False}


@dataclass
class Variant:
    name: str
    batch: int
    sets: dict = field(default_factory=dict)  # config keys changed from make-dist's defaults
    math_attention: bool = False  # SDPA without flash / memory-efficient kernels
    prefetch: bool = True
    loader: bool = False  # fed live by the loader instead of batches in memory


def variants(batch: int, large: int, loader: bool) -> list[Variant]:
    """In the order they run: the slow-to-start compiled ones last, so that a
    run cut short loses the fewest rows."""
    return [
        Variant("baseline: full texts, dense loss, checkpointing, unfused AdamW", batch, BASELINE),
        Variant("make-dist", batch),
        Variant("make-dist - text buckets (one cut to the longest)", batch, {"model.text_batching": "longest"}),
        Variant("make-dist - Triton loss (dense torch)", batch, {"loss.backend": "torch"}),
        Variant("make-dist - fused AdamW", batch, {"optim.fused": False}),
        Variant("make-dist - prefetch", batch, prefetch=False),
        Variant("make-dist - flash attention (math SDPA)", batch, math_attention=True),
        Variant("make-dist + checkpointing", batch, {"model.grad_checkpointing": True}),
        Variant("make-dist, ZeRO-1", batch, {"train.zero_stage": 1}),
        Variant(f"make-dist, batch {large}", large),
        Variant(f"make-dist, batch {large}, text checkpointing", large, {"model.grad_checkpointing": "text"}),
        Variant(f"make-dist, batch {large}, image checkpointing", large, {"model.grad_checkpointing": "image"}),
        Variant(f"make-dist, batch {large}, checkpointing", large, {"model.grad_checkpointing": True}),
        *([Variant("make-dist fed live by the loader", batch, loader=True)] if loader else []),
        Variant("make-dist + compile", batch, {"model.compile": True}),
        Variant(f"make-dist + compile, batch {large}, checkpointing", large,
                {"model.grad_checkpointing": True, "model.compile": True}),
    ]


# ---------------------------------------------------------------------------
# Set-up


def base_config(args, manifest: str) -> list[str]:
    """The --set overrides of configs/paper.yaml that every variant shares."""
    return [f"model.name={args.model}", "model.pretrained=null", "model.grad_checkpointing=false",
            "train.workers=1", f"train.use_gpu={str(args.gpu).lower()}", f"train.precision={args.precision}",
            "train.steps=100000", "optim.warmup_steps=10", f"data.train_shards={manifest}",
            f"data.num_workers={args.loader_workers}"]


def make_data(args, work: Path) -> str:
    if not (work / "shards/manifest.json").exists():
        t = time.perf_counter()
        synthesize(work / "synth", n=args.samples, n_eval=1, size=args.image_side, seed=0, progress=False)
        write_shards(str(work / "synth/train.csv"), str(work / "shards"),
                     load_column_map(ROOT / "configs/columns/synthetic.yaml"), images_root=str(work / "synth"),
                     shard_size=256, progress=False)
        say(f"data: {args.samples} synthetic samples at {args.image_side} px in shards ({time.perf_counter() - t:.0f} s)")
    return str(work / "shards/manifest.json")


def loader(cfg, model, manifest: str, batch_size: int, n: int, workers: int, seed: int):
    """The trainer's loader (augmented, tokenised as the loss reads) over the shards: n batches per worker."""
    data = replace(cfg.data, train_shards=manifest, batch_size=batch_size, num_workers=workers, resampled=True)
    read = MakeLoss.from_config(cfg.loss).slots_read(n_slots(cfg.data.subtexts))
    return make_loader(data, tokenizer(cfg.model), image_size=model.image_size, read=read, seed=seed,
                       batches_per_worker=n)


def memory_batches(cfg, model, manifest: str, batch_size: int, n: int, workers: int) -> list[Batch]:
    """n batches from the loader, held in (pinned) host memory. No more workers
    than batches, each making only its share: nothing is made to be dropped."""
    workers = min(workers, n)
    per_worker = -(-n // workers)
    out = list(itertools.islice(loader(cfg, model, manifest, batch_size, per_worker, workers, seed=1), n))
    return [b.pin_memory() for b in out] if torch.cuda.is_available() else out


def loader_rate(cfg, model, manifest: str, batch_size: int, workers: int, n_batches: int) -> float:
    """Samples/s of the loader alone, once every worker has started."""
    batches_ = iter(loader(cfg, model, manifest, batch_size, n_batches, workers, seed=2))
    for _ in range(workers):  # every worker started, each with its first batch made
        next(batches_)
    start, n = time.perf_counter(), 0
    for b in batches_:
        n += len(b)
    return n / (time.perf_counter() - start)


# ---------------------------------------------------------------------------
# One variant


def variant_config(v: Variant, sets: list[str]):
    """configs/paper.yaml with the shared overrides and the variant's own."""
    return load_config(ROOT / "configs/paper.yaml", sets + [f"data.batch_size={v.batch}"] +
                       [f"{k}={json.dumps(x) if isinstance(x, bool) else x}" for k, x in v.sets.items()])


def run_variant(v: Variant, args, sets: list[str], data: dict[int, list[Batch]]) -> dict:
    cfg = variant_config(v, sets)
    device = torch.device("cuda", torch.cuda.current_device()) if args.gpu else torch.device("cpu")
    trainer = Trainer(cfg, 0, 1, device)  # the users' trainer: its seed, model, engine and loss
    model = trainer.model

    host = trainer.batches() if v.loader else itertools.cycle(data[v.batch])
    if v.prefetch:
        stream = prefetch(host, device)
    else:  # copied on the compute stream when the step starts
        stream = (b.to(device) for b in host)
    flops = sum(model.train_flops(v.batch, b.lengths) for b in data[v.batch]) / len(data[v.batch])

    with math_attention() if v.math_attention else contextlib.nullcontext():
        synchronize(args)
        losses, t_first = [], time.perf_counter()
        warmup = args.warmup + (3 if cfg.model.compile else 0)  # compiling for each text bucket's shapes
        for i in range(warmup):
            result = trainer.step(next(stream))
            losses.append(float(result["loss/total"]) if result is not None else float("nan"))
        if args.gpu:
            torch.cuda.reset_peak_memory_stats()
        synchronize(args)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step(next(stream))
        synchronize(args)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.gpu else float("nan")
    rate = v.batch * args.steps / elapsed
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else device_peak(args)
    result = {
        "variant": v.name, "batch": v.batch, "samples_per_s": rate, "step_s": elapsed / args.steps,
        "peak_gib": peak, "mfu": flops * rate / v.batch / peak_flops if peak_flops else float("nan"),
        "first_loss": losses[0] if losses and not v.loader else float("nan"), "warmup_s": start - t_first,
    }
    del trainer, model, stream, host
    gc.collect()
    if args.gpu:
        torch.cuda.empty_cache()
    return result


def math_attention():
    """SDPA limited to its plain matmul path (no flash, no memory-efficient kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def synchronize(args) -> None:
    if args.gpu:
        torch.cuda.synchronize()


def device_peak(args) -> float | None:
    if not args.gpu:
        return None
    name = torch.cuda.get_device_name()
    return next((rate for key, rate in PEAK_BF16 if key in name), None)


# ---------------------------------------------------------------------------
# Report


def write_report(out: Path, results: list[dict], facts: dict) -> None:
    base = next((r for r in results if r["variant"].startswith("baseline") and "samples_per_s" in r), None)
    lines = [f"# bench/step.py, {facts['date']}", "",
             f"card: {facts['device']}; torch {facts['torch']}, triton {facts['triton']}, deepspeed "
             f"{facts['deepspeed']}; model {facts['model']}, {facts['precision']}; {facts['steps']} timed steps "
             f"after {facts['warmup']} warm-up; command: `{facts['command']}`", "",
             "Peak: the most GPU memory allocated during the timed steps (an H100 80GB holds about 78 GiB). "
             "MFU: model FLOPs (texts at their real lengths, make_dist.model.train_flops) over the card's peak "
             "dense bf16 rate.", "",
             "| variant | batch | samples/s | vs baseline | peak GiB | MFU | first loss | Δ loss vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else ""
        same = base and r["batch"] == base["batch"] and r["first_loss"] == r["first_loss"]  # not NaN
        delta = f"{r['first_loss'] - base['first_loss']:+.4f}" if same else ""
        lines.append(f"| {r['variant']} | {r['batch']} | {_num(r['samples_per_s'], '.1f' if r['samples_per_s'] >= 10 else '.3f')} | {ratio} | {_num(r['peak_gib'], '.1f')} | "
                     f"{_num(r['mfu'], '.1%')} | {_num(r['first_loss'], '.4f')} | {delta} |")
    for key in ("loader", "notes"):
        if facts.get(key):
            lines += ["", *facts[key]]
    write_atomic(str(out / "step.md"), "\n".join(lines) + "\n")
    write_atomic(str(out / "step.json"), json.dumps({"facts": facts, "results": results}, indent=1))


def flop_table(model, batches: list[Batch], rate: float, peak: float) -> list[str]:
    """Per-sample FLOPs of a step (3 forwards) on these batches: the model FLOPs
    (texts at their real lengths), and what each text batching computes with
    its padding. Needs no GPU."""
    n = sum(len(b) for b in batches)
    image = model.train_flops(n, torch.zeros(1)) / n

    def texts(cut) -> float:
        return sum(model.train_flops(0, cut(b)) for b in batches) / n

    context = model.context_length
    real = texts(lambda b: b.lengths)
    padded = {
        "full (every slot at 77 tokens)": texts(lambda b: torch.full(b.mask.shape, context)),
        "longest (valid texts cut to the batch's longest)": texts(lambda b: b.mask * int(b.lengths.max())),
    }
    for bucket in (32, 16, 8):
        padded[f"buckets (valid texts cut to multiples of {bucket})"] = texts(
            lambda b, bucket=bucket: ((b.lengths + bucket - 1) // bucket * bucket).clamp(max=context) * b.mask)
    lines = [f"FLOPs per sample of a training step (forward + backward), batch {len(batches[0])}, "
             f"{len(batches)} batches:", "",
             "| text batching | image tower GFLOP | text tower GFLOP | step GFLOP | vs model FLOPs |",
             "|---|---|---|---|---|",
             f"| model FLOPs (texts at their real lengths) | {image / 1e9:.1f} | {real / 1e9:.1f} | "
             f"{(image + real) / 1e9:.1f} | 1.00x |"]
    for name, text in padded.items():
        lines.append(f"| {name} | {image / 1e9:.1f} | {text / 1e9:.1f} | {(image + text) / 1e9:.1f} | "
                     f"{(image + text) / (image + real):.2f}x |")
    lines += ["", f"{rate:.0f} samples/s is {rate * (image + real) / 1e12:.0f} TFLOP/s of model FLOPs, "
              f"{rate * (image + real) / peak:.1%} MFU at {peak / 1e12:.0f} TFLOP/s peak bf16"]
    return lines


def _num(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)  # NaN: not measured here


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for step.md and step.json (default: print only)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny model, tiny batches, 2 variants")
    p.add_argument("--model", default=None, help="architecture (default: the paper's; --small: make-tiny)")
    p.add_argument("--batch", type=int, default=None, help="default 512 (--small: 8)")
    p.add_argument("--large", type=int, default=None, help="the paper's batch on the one card: 2048 (--small: 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps: 10 (--small: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first: 3 (--small: 1)")
    p.add_argument("--batches", type=int, default=None, help="distinct batches of each size in memory: 3 (--small: 2)")
    p.add_argument("--image-side", type=int, default=None, help="side of the synthetic images: 320 (--small: 64)")
    p.add_argument("--flops", action="store_true",
                   help="only count FLOPs per sample on the data (any machine; ViT-B/16 by default, even on a CPU)")
    p.add_argument("--only", default=None, help="comma-separated variant numbers (1-based) to run")
    p.add_argument("--loader", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the loader and the step fed by it (default: on a GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak bf16 rate, for MFU")
    p.add_argument("--work", default=None, help="data folder (default: a temporary one)")
    args = p.parse_args()

    args.gpu = torch.cuda.is_available() and not args.small
    if not args.gpu and not args.small and not args.flops:
        sys.exit("bench/step.py: no GPU here; --small runs it on the CPU (tiny model by default)")
    if args.flops:  # lengths are all it reads: small images, the paper's model
        defaults = dict(model="ViT-B-16-quickgelu", batch=512, batches=2, image_side=64, samples=1024)
    elif args.small:
        defaults = dict(model="make-tiny", batch=8, large=16, steps=1, warmup=1, batches=2, image_side=64, samples=64)
    else:
        defaults = dict(model="ViT-B-16-quickgelu", batch=512, large=2048, steps=10, warmup=3, batches=3,
                        image_side=320, samples=2048)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.precision = "bf16" if args.gpu else "fp32"
    args.cores = os.cpu_count() or 1
    args.loader_workers = max(1, min(args.cores - 2, 16)) if not args.small else 1
    args.loader = args.gpu if args.loader is None else args.loader
    return args


def chosen_variants(args) -> list[Variant]:
    chosen = variants(args.batch, args.large, args.loader)
    if args.only:
        return [chosen[int(i) - 1] for i in args.only.split(",")]
    if args.small:  # baseline, make-dist, the large batch (and the loader)
        return [v for i, v in enumerate(chosen) if i in (0, 1, 9) or v.loader]
    return chosen


def run_facts(args, batches_: list[Batch]) -> dict:
    """What the report says about the run: card, versions, command, the texts of the data."""
    import deepspeed
    import triton

    lengths = torch.cat([b.lengths[b.mask] for b in batches_]).float()
    per_sample = sum(int(b.mask.sum()) for b in batches_) / sum(len(b) for b in batches_)
    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.gpu else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "deepspeed": deepspeed.__version__,
            "model": args.model, "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
            "command": " ".join(["python", *sys.argv]), "cores": args.cores,
            "notes": [f"texts per sample {per_sample:.2f} (of 11 slots); real tokens per text mean "
                      f"{lengths.mean():.1f}, max {lengths.max():.0f}"]}


def run_one(v: Variant, args, sets: list[str], data: dict[int, list[Batch]]) -> dict:
    """One variant's row; a failure is recorded and the bench goes on."""
    try:
        r = run_variant(v, args, sets, data)
        say(f"    {r['samples_per_s']:.1f} samples/s, peak {_num(r['peak_gib'], '.1f')} GiB, "
            f"MFU {_num(r['mfu'], '.1%')}, first loss {_num(r['first_loss'], '.4f')} (warm-up {r['warmup_s']:.0f} s)")
    except torch.OutOfMemoryError:
        r = {"variant": v.name, "batch": v.batch, "error": "out of memory"}
        say("    out of memory")
    except Exception as e:  # one broken lever must not cost the other measurements
        traceback.print_exc()
        r = {"variant": v.name, "batch": v.batch, "error": f"failed: {type(e).__name__}: {str(e)[:160]}"}
    gc.collect()  # after the except block, which held the failed variant's frames
    if args.gpu:
        torch.cuda.empty_cache()
    return r


def main() -> None:
    args = parse_args()
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    ds.init_single_process(args.gpu)
    manifest = make_data(args, Path(args.work or tempfile.mkdtemp(prefix="bench-step-")))
    sets = base_config(args, manifest)
    cfg = load_config(ROOT / "configs/paper.yaml", sets)
    model = build_model(cfg.model)  # its image size and tokenizer, for the loader

    if args.flops:  # count only: the FLOP table of --batches batches
        data = memory_batches(cfg, model, manifest, args.batch, args.batches, args.loader_workers)
        say("\n".join(flop_table(model, data, rate=1500, peak=args.peak_tflops * 1e12 if args.peak_tflops
                                  else 989e12)))
        return
    chosen = chosen_variants(args)
    t = time.perf_counter()
    data = {b: memory_batches(cfg, model, manifest, b, args.batches, args.loader_workers)
            for b in sorted({v.batch for v in chosen})}
    say(f"batches in memory: {', '.join(f'{len(v)} x {b}' for b, v in data.items())} "
        f"({time.perf_counter() - t:.0f} s)")
    facts = run_facts(args, data[min(data)])
    if args.loader:
        rate = loader_rate(cfg, model, manifest, args.batch, args.loader_workers, n_batches=4)
        facts["loader"] = [f"loader alone: {rate:.0f} samples/s with {args.loader_workers} workers on "
                           f"{args.cores} cores ({rate / args.loader_workers:.0f} per worker), batch {args.batch}"]
        say(facts["loader"][0])
    results = []
    for i, v in enumerate(chosen, 1):
        say(f"[{i}/{len(chosen)}] {v.name} (batch {v.batch}) ...")
        results.append(run_one(v, args, sets, data))
        if out:
            write_report(out, results, facts)
    if out:
        say((out / "step.md").read_text())


if __name__ == "__main__":
    main()
