"""Compile the kernels for a GPU this machine does not have, and read what each
build costs on the card: registers, spilled bytes, shared memory.

The interpreter (what CI runs) checks values, not whether a kernel lowers,
spills or fits the card's shared memory. `triton.compile` of the kernel's
source for a `GPUTarget` runs Triton's passes and ptxas (in the triton
wheel) without a GPU; `cuobjdump --dump-resource-usage` (also in the wheel)
reads the cubin. Run without TRITON_INTERPRET (interpreted kernels do not
compile). bench/kernels.py --compile-only prints the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import contrastive, pooling, tuning

# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def all_builds(arch: int, D: int = 512, dtypes: tuple[str, ...] = ("bf16", "fp32"),
               wide: bool = False) -> list[tuple[str, str, tuple]]:
    """(dtype name, kernel name, build) of every kernel the launchers run at width D
    on sm_<arch>, in each configuration shipped for the autotuner; wide: with
    64-bit offsets, in the first configuration (what a launch past 2^31 elements runs)."""
    out = []
    for name in dtypes:
        for build in (contrastive.builds(DTYPES[name], D, arch, wide=wide)
                      + pooling.builds(DTYPES[name], D, arch, wide=wide)):
            out.append((name, build[0].__name__, build))
    return out


def resources(build: tuple, arch: int) -> dict:
    """Compile one build for sm_<arch>; its registers, spills and shared memory."""
    if tuning.INTERPRETED:
        raise RuntimeError("kernels/build.py compiles real kernels: run it without TRITON_INTERPRET=1")
    fn, signature, constants, options = build
    compiled = triton.compile(ASTSource(fn, {**signature, **{k: "constexpr" for k in constants}}, constants),
                              target=GPUTarget("cuda", arch, 32), options=options)
    usage = _cubin_usage(compiled.asm["cubin"], fn.__name__)
    shared = compiled.metadata.shared + usage["SHARED"]  # dynamic (Triton's buffers) + static
    return {"kernel": fn.__name__, "target": f"sm_{arch}", "triton": triton.__version__,
            "config": {**constants, **options},
            "registers": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"],
            "shared_bytes": shared, "shared_fits": shared <= SHARED_LIMIT[arch]}


def _cubin_usage(cubin: bytes, name: str) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    line = text[text.index(f"Function {name}"):].splitlines()[1]
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}
