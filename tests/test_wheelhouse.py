"""The offline wheel set: its pins come from the lock, Ray's wheel is trimmed
right, make-dist's own wheel carries the package and the kernels (as
make_dist_kernels). (The downloads themselves need the package registries:
`make wheelhouse`.)"""

import subprocess
import sys
import zipfile

import pytest

from make_dist.errors import UserError
from make_dist.wheelhouse import HOST_LACKS, build_own_wheel, pinned, trim_wheel


def test_every_package_is_pinned_by_the_lock(repo_root):
    pins = pinned([*HOST_LACKS, "ray", "deepspeed"])
    assert "ray==2.60.0" in pins and "deepspeed==0.19.8" in pins and "mlflow-skinny==3.17.2" in pins
    lock = (repo_root / "requirements.lock").read_text()
    for pin in pins:  # the lock's own spelling or a normalised one
        name, version = pin.split("==")
        assert f"=={version}" in lock, pin


def test_a_package_the_lock_does_not_pin_is_named(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("ray==2.60.0\n# a comment\n")
    assert pinned(["Ray"], lock) == ["Ray==2.60.0"]
    with pytest.raises(UserError, match="pins no version of webdataset"):
        pinned(["ray", "webdataset"], lock)


def test_trimmed_wheel_drops_the_members_and_their_record_lines(tmp_path):
    src, dst = tmp_path / "ray-1.0-py3-none-any.whl", tmp_path / "out.whl"
    members = {"ray/__init__.py": b"x = 1\n", "ray/jars/big.jar": b"j" * 1000, "ray/dashboard/app.js.map": b"m",
               "ray/dashboard/app.js": b"js"}
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in members.items())
    with zipfile.ZipFile(src, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("ray-1.0.dist-info/RECORD", record)
    trim_wheel(src, dst)
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None
        assert sorted(z.namelist()) == ["ray-1.0.dist-info/RECORD", "ray/__init__.py", "ray/dashboard/app.js"]
        kept = z.read("ray-1.0.dist-info/RECORD").decode().splitlines()
        assert [line.split(",")[0] for line in kept] == ["ray/__init__.py", "ray/dashboard/app.js"]
        assert z.read("ray/__init__.py") == b"x = 1\n"


def test_every_package_is_listed_and_the_kernels_install_under_their_own_name(repo_root):
    """pyproject.toml lists its packages (kernels/ installs as make_dist_kernels, which
    `find` cannot do): a folder of make_dist/ holding modules and missing there would
    be left out of the wheel, though an editable install imports it."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"make_dist_kernels": "kernels"}
    folders = {".".join(p.parent.relative_to(repo_root).parts) for p in (repo_root / "make_dist").rglob("*.py")}
    assert sorted(setuptools["packages"]) == sorted(folders | {"make_dist_kernels"})


@pytest.mark.slow
def test_own_wheel_installs_the_package_and_the_kernels(tmp_path):
    wheel = build_own_wheel(tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"make_dist/cli.py", "make_dist/model_configs/make-tiny.json", "make_dist_kernels/contrastive.py"} <= names
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"make_dist", "make_dist_kernels"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(wheel)], check=True)
    assert not (site / "kernels").exists()  # a PyPI package's top-level name
    code = ("import make_dist.slots, make_dist_kernels, pathlib, make_dist; "
            "print(pathlib.Path(make_dist.__file__).parent)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "make_dist")  # the installed copy, not the checkout
