"""An offline wheel set: make-dist on a GPU host without internet.

GPU clusters in hospitals are often air-gapped, and their hosts come with
Python and a CUDA build of torch (triton included) and little else.
`make wheelhouse` (`make-dist wheelhouse --out wheelhouse`), run on a
machine that reaches the package registries, gathers every other package
make-dist needs at run time, for the host's Python and platform, at the
versions of `requirements.lock`, plus make-dist's own wheel. On the host:

    python3 -m pip install --no-index --no-deps --target SITE wheelhouse/*.whl
    export PYTHONPATH=SITE

About 52 MiB: Ray's wheel is rewritten without its Java jars and source
maps, and MLflow comes as mlflow-skinny (the client: tracking to a server
or a sqlite store; no UI). DeepSpeed is built into a wheel here (it
compiles its ops on the host, at first use).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"

# What a host with Python, a CUDA torch and triton lacks for make-dist's run
# time (seen on such a host: Python 3.12, torch 2.11, triton 3.6).
HOST_LACKS = (
    "annotated-types", "braceexpand", "cachetools", "cffi", "cryptography", "databricks-sdk", "fastapi", "ftfy",
    "gitdb", "GitPython", "google-auth", "hjson", "importlib_metadata", "jsonschema", "jsonschema-specifications",
    "mlflow-skinny", "nvidia-ml-py", "open_clip_torch", "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions", "pyasn1", "pyasn1_modules", "pycparser", "pydantic", "pydantic_core",
    "python-dotenv", "referencing", "rpds-py", "smmap", "sqlparse", "starlette", "typing-inspection", "uvicorn",
    "wcwidth", "webdataset",
)
RAY_DROPS = (r"^ray/jars/", r"\.js\.map$")  # Java jars and source maps: about a third of the wheel
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(names, lock: Path = LOCK) -> list[str]:
    """`name==version` of each package, the version from the lock file."""
    try:
        lines = lock.read_text().splitlines()
    except OSError as e:
        raise UserError(f"wheelhouse: cannot read {lock} (run it from a checkout of make-dist): {e.strerror}") from None
    versions = {}
    for line in lines:
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            versions[normalise(name)] = version.strip()
    missing = [n for n in names if normalise(n) not in versions]
    if missing:
        raise UserError(f"wheelhouse: {lock.name} pins no version of {', '.join(missing)}")
    return [f"{n}=={versions[normalise(n)]}" for n in names]


def trim_wheel(src: Path, dst: Path, drop: tuple[str, ...] = RAY_DROPS) -> None:
    """Rewrite a wheel without the members matching `drop` (nor their RECORD lines), LZMA-compressed."""
    patterns = [re.compile(p) for p in drop]
    dropped = lambda name: any(p.search(name) for p in patterns)  # noqa: E731
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            if dropped(info.filename):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines() if not dropped(line.split(",")[0])]
                data = ("\n".join(kept) + "\n").encode()
            member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            member.external_attr = info.external_attr
            member.compress_type = zipfile.ZIP_LZMA
            zout.writestr(member, data)


def build_own_wheel(out: Path) -> Path:
    """make-dist's own wheel (make_dist and the kernels, as make_dist_kernels) into `out`.
    setuptools packs whatever its build/ folder holds: a package an earlier build
    left there (the kernels' former top-level name `kernels`) would ship too."""
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT))
    (wheel,) = sorted(out.glob("make_dist-*.whl"))
    return wheel


def build(out: str | Path, python: str = "3.12", platforms: tuple[str, ...] = PLATFORMS,
          also: tuple[str, ...] = ()) -> list[Path]:
    """The wheel set for a host running `python` on `platforms`; returns its wheels."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
              *[arg for p in platforms for arg in ("--platform", p)]]
    print(f"wheelhouse: {len(HOST_LACKS) + len(also)} packages for Python {python} ({platforms[0]}, ...)")
    _pip("download", "--no-deps", *target, "-d", str(out), *pinned([*HOST_LACKS, *also]))
    with tempfile.TemporaryDirectory() as tmp:
        print("wheelhouse: ray, without its jars and source maps")
        _pip("download", "--no-deps", *target, "-d", tmp, *pinned(["ray"]))
        (ray_wheel,) = Path(tmp).glob("ray-*.whl")
        trim_wheel(ray_wheel, out / ray_wheel.name)
    print("wheelhouse: deepspeed (built here; its ops compile on the host at first use)")
    _pip("wheel", "--no-deps", "-w", str(out), *pinned(["deepspeed"]))
    print("wheelhouse: make-dist")
    build_own_wheel(out)
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"wheelhouse: {len(wheels)} wheels, {size:.0f} MiB in {out}. On the host:\n"
          f"  python3 -m pip install --no-index --no-deps --target SITE {out}/*.whl && export PYTHONPATH=SITE")
    return wheels


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"wheelhouse: pip {args[0]} failed:\n{result.stderr.strip()[-2000:]}")
