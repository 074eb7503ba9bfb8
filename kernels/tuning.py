"""How a kernel is configured on the card it runs on.

- Each kernel ships a few configurations (tiles, warps, stages) per target:
  sm_80 (A100) and sm_90 (H100/H200). On a GPU, Triton's autotuner times the
  target's configurations once per problem shape and keeps the fastest;
  under the interpreter (CI) the first one runs, and tests pick any with
  `config=`. kernels/build.py compiles every shipped configuration for both
  targets without a GPU.
- A kernel walks one long dimension (the reduction) for each block of the
  other (the parallel one). When the parallel blocks alone are too few to
  fill the card (one rank's 2,048 images are 32 blocks of 64 rows; an H100
  has 132 SMs), `splits` cuts the reduction into chunks, one program each,
  whose partial results the launcher adds up. Chunks are multiples of ALIGN
  so that every shipped tile (at most ALIGN long) covers the same ones: any
  configuration writes every element of the partial buffers, which keeps
  the autotuner's trial runs harmless.
- `Options`: what a caller chooses about a launch (autotuning, its clock, the
  tests' poisoned buffers, the chunks' alignment), passed down as an argument:
  nothing here is read from the environment or set by patching this module.
  Whether the kernels run in Triton's interpreter is Triton's choice, made when
  they are defined (TRITON_INTERPRET=1 then); `INTERPRETED` reads it off them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
import triton.testing

TARGETS = (80, 90)
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
ALIGN = 128  # the largest tile along a split dimension
WAVES = 2  # programs per SM the splits aim for
MAX_SPLITS = 8  # bounds the partial buffers: at most 8 x rows x D float32
MIN_SPLIT = 1024  # a chunk shorter than this costs more in partial sums than it gains


@triton.jit
def widen(index, WIDE: tl.constexpr):
    """An index (a program id, a tile's rows) in 64 bits when WIDE, so every offset
    computed from it is; else as it is: 64-bit offset tiles cost registers, and the
    streamed-D backward builds spilled with them."""
    if WIDE:
        index = index.to(tl.int64)
    return index


# Whether Triton built this package's kernels for its interpreter (it does when
# TRITON_INTERPRET=1 as they are defined: CI, on CPU tensors) rather than for a GPU.
INTERPRETED = not isinstance(widen, triton.runtime.JITFunction)


@dataclass(frozen=True)
class Options:
    """How the kernels launch; every launcher takes one (`options=`), the default safe.

    autotune: time every shipped configuration once per problem shape and keep
    the fastest (Triton's autotuner); None: on a GPU, not under the interpreter
    (which runs the first). timer: the autotuner's clock, do_bench(fn, quantiles)
    (tests: a CPU clock; its timings are not kept on disk); None: CUDA events,
    the results kept in Triton's cache. poison (tests): partial-sum buffers start
    as NaN, so an element a kernel leaves unwritten shows. align: the chunks of a
    split reduction are multiples of it (ALIGN; tests cut tiles with another)."""

    autotune: bool | None = None
    timer: Callable | None = None
    poison: bool = False
    align: int = ALIGN

    def tunes(self) -> bool:
        return not INTERPRETED if self.autotune is None else self.autotune


DEFAULT = Options()


def target(device: torch.device) -> int:
    """The configuration table a device uses: 90 from Hopper on, else 80
    (also the interpreter's: 90, whose tiles tests exercise first)."""
    if INTERPRETED or device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number


def splits(parallel: int, reduction: int, device: torch.device, block: int = 64,
           min_split: int = MIN_SPLIT, n: int | None = None, align: int = ALIGN,
           sms: int | None = None) -> tuple[int, int]:
    """(number of chunks, chunk length) for a reduction of `reduction` items
    walked by each of cdiv(parallel, block) blocks. Blocks enough for every
    SM: no cut (a partial buffer costs memory: 8 x 16,384 rows x 512 float32
    would be 256 MB). Fewer: enough chunks for WAVES programs per SM, none
    shorter than min_split, at most MAX_SPLITS. n: at most n chunks instead
    (tests, benchmarks). align: as fixed_splits. sms: the device's SM count
    (default: read from it)."""
    if n is not None:
        return fixed_splits(reduction, n, align)
    blocks, sms = max(1, triton.cdiv(parallel, block)), sms or sm_count(device)
    n = 1 if blocks >= sms else max(1, min(triton.cdiv(WAVES * sms, blocks), MAX_SPLITS, reduction // min_split))
    return fixed_splits(reduction, n, align)


def fixed_splits(reduction: int, n: int, align: int = ALIGN) -> tuple[int, int]:
    """(chunks, chunk length) of `reduction` cut into at most n chunks, multiples of align."""
    length = triton.cdiv(triton.cdiv(max(reduction, 1), max(n, 1)), align) * align
    return triton.cdiv(max(reduction, 1), length), length


FEATURE_BLOCKS = ("BLOCK_K", "BLOCK_DO")  # chunks of the feature dimension


def block_d(D: int) -> int:
    """The padded feature width a program's tiles span (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(D))


def wide(asked: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether a launch needs 64-bit offsets: as asked, or when one of its tensors
    has 2^31 elements or more (32-bit offsets would wrap)."""
    return asked if asked is not None else any(t.numel() >= 2**31 for t in tensors)


def partials(*shape: int, device: torch.device, options: Options = DEFAULT) -> torch.Tensor:
    """A float32 buffer of partial sums, one slice per chunk, each element written by a kernel
    (NaN first if options.poison)."""
    if options.poison:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


def resolve(config: dict, block_d: int) -> dict:
    """A shipped configuration at a padded feature width: "D" (the whole width)
    filled in, feature chunks no wider than the features."""
    out = {k: block_d if v == "D" else v for k, v in config.items()}
    return {k: min(v, block_d) if k in FEATURE_BLOCKS else v for k, v in out.items()}


def _short_bench(fn, quantiles):
    """The kernels run 0.1-10 ms and the choice is between a few: short timings."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles)


def _autotune_args(timer: Callable | None) -> dict:
    """triton.autotune's clock and caching. Its own clock's results are kept on
    disk where this Triton can (its cache, keyed by source, configurations and
    shape): a restarted run or a second process does not time them again. The
    GPU hosts' Triton may be older than the pinned one."""
    wanted = {"do_bench": timer or _short_bench, "cache_results": timer is None}
    return {k: v for k, v in wanted.items() if k in inspect.signature(triton.autotune).parameters}


class Tuned:
    """One Triton kernel and its shipped configurations per target.

    configs: {target: [dict of constants + num_warps + num_stages]}, the
    first of each list the default. key: the arguments whose values make a
    new problem shape (the autotuner times the configurations once per
    shape)."""

    def __init__(self, fn, configs: dict[int, list[dict]], key: list[str]):
        self.fn, self.configs, self.key = fn, configs, key
        self._tuners: dict = {}

    def options(self, arch: int, block_d: int) -> list[tuple[dict, dict]]:
        """(constants, launch options) of every configuration shipped for sm_<arch>."""
        out = []
        for config in self.configs[arch]:
            c = resolve(config, block_d)
            out.append(({k: v for k, v in c.items() if k.isupper()},
                        {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}))
        return out

    def runnable(self, arch: int, block_d: int, wide: bool = False) -> list[tuple[dict, dict]]:
        """The configurations a launch without `config=` may run on sm_<arch>: every
        shipped one (the autotuner's pick), or with 64-bit offsets the first."""
        options = self.options(arch, block_d)
        return options[:1] if wide else options

    def __call__(self, grid, *args, device: torch.device, config: int | tuple[int, int] | None = None,
                 options: Options = DEFAULT, **constants):
        """Launch on `grid` (a function of the chosen constants). constants:
        the kernel's own (BLOCK_D among them, the padded feature width).
        config: run a shipped configuration instead of the autotuner's choice
        (tests, benchmarks): an index into the device's list, or (target,
        index); an index past the list's end takes its last. Without
        autotuning (options.tunes(); the interpreter's default) the first
        runs, and so does a launch with 64-bit offsets (WIDE): of those
        builds only the first configurations are spill-free
        (docs/BENCHMARKS.md)."""
        arch, block_d = target(device), constants["BLOCK_D"]
        if config is not None or not options.tunes() or constants.get("WIDE"):
            arch, index = config if isinstance(config, tuple) else (arch, config or 0)
            shipped = self.options(arch, block_d)
            meta, launch = shipped[min(index, len(shipped) - 1)]
            return self.fn[grid(meta)](*args, **constants, **meta, **launch)
        tuner = self._tuners.get((arch, block_d, options.timer))
        if tuner is None:
            configs = [triton.Config(meta, **launch) for meta, launch in self.options(arch, block_d)]
            tuner = self._tuners[(arch, block_d, options.timer)] = triton.autotune(
                configs=configs, key=self.key, **_autotune_args(options.timer))(self.fn)
        return tuner[grid](*args, **constants)

    def chosen(self) -> list[str]:
        """What the autotuner picked so far: 'sm_90 D512 (R, NC, D, ...) -> config', one per
        shape, and each configuration's time (ms) at the shape it tuned last."""
        out = []
        for (arch, block_d, _), tuner in self._tuners.items():
            out += [f"sm_{arch} D{block_d} {key} -> {config}" for key, config in tuner.cache.items()]
            timings = getattr(tuner, "configs_timings", None) or {}
            out += [f"  last tuned: {config} {t if isinstance(t, float) else t[0]:.3f} ms"
                    for config, t in timings.items()]
        return out

    def count(self) -> int:
        """The longest list of configurations shipped for any target."""
        return max(len(configs) for configs in self.configs.values())
