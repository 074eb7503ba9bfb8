"""Files at any fsspec URL or local path: atomic writes, bytes, images.

A file written here appears complete or not at all: it is written beside its
final name and renamed, so a crash or a stop never leaves half a file where a
reader (a resumed run, another node) would take it for whole.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec
from PIL import Image

from .errors import UserError


@contextlib.contextmanager
def atomic_writer(url: str, mode: str = "wb") -> Iterator[io.IOBase]:
    """A file object whose content appears at `url` only when the block ends
    without an error (written to a hidden name beside it, then renamed)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp"
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_atomic(url: str, data: bytes | str) -> None:
    """`data` at `url`, all of it or nothing."""
    with atomic_writer(url, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


class OutsideRoot(ValueError):
    """An image path of a table that leaves the folder its images are under."""


def image_location(path: str, root: str | None, anywhere: bool = False) -> str:
    """Where a table's image path points: a relative path under `root` (the
    working directory when there is none). Unless `anywhere`, a path that
    leaves the root ('..', an absolute path or a URL elsewhere) raises
    OutsideRoot: a table is data, and must not make make-dist read (and pack
    into shards others may get) a file or URL its user never named."""
    base = root or os.getcwd()
    joined = path if ("://" in path or os.path.isabs(path)) else base.rstrip("/") + "/" + path
    if not anywhere and not within(joined, base):
        raise OutsideRoot(f"image path {path!r} leaves the images root ({base}); pass --images-anywhere "
                          f"(evaluation.images_anywhere) to read such paths as written")
    # read what was checked: the OS would resolve '..' after following a link
    return joined if "://" in joined else os.path.normpath(joined)


def within(url: str, root: str) -> bool:
    """Whether `url`, its '..' resolved, lies under `root` (the same scheme and place)."""

    def parts(u: str) -> tuple[str, str]:
        scheme, sep, rest = u.partition("://")
        if not sep:
            scheme, rest = "file", os.path.abspath(u)
        elif scheme == "file":
            rest = os.path.abspath(rest)
        return scheme, posixpath.normpath("/" + rest.lstrip("/"))

    (scheme, path), (root_scheme, root_path) = parts(url), parts(root)
    return scheme == root_scheme and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))


def read_bytes(url: str) -> bytes:
    with fsspec.open(str(url), "rb") as f:
        return f.read()


def open_image(data: bytes, fit: int | None = None) -> Image.Image:
    """A decoded image (its own mode). A JPEG is decoded at the smallest DCT
    scale whose sides still cover `fit` pixels: a 1600-px photo for a 224-px
    crop decodes at an eighth of the work. Raises on truncated or empty files."""
    image = Image.open(io.BytesIO(data))
    if fit and image.format == "JPEG" and max(image.size) > fit:
        image.draft("RGB", (fit, fit))
    image.load()
    if image.width < 1 or image.height < 1:
        raise ValueError("empty image")
    return image


# ---------------------------------------------------------------------------
# Object storage: checks before any worker starts, and errors in the user's terms


def storage_problem(e: BaseException) -> str:
    """What a failed storage call means, in one line: the credentials, the
    endpoint, a permission or a missing object (botocore's and s3fs's errors
    are told apart by name, so no cloud SDK is imported here)."""
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                "environment of the driver and of every node")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        return (f"cannot reach the storage endpoint ({endpoint or 'the default AWS endpoint'}"
                f"{', from AWS_ENDPOINT_URL' if endpoint else ''}): {e}")
    if isinstance(e, PermissionError) and type(e.__cause__).__name__ == "ClientError":  # the object store said no
        return (f"permission denied ({e}): the credentials in use may not do this here; check the policy of "
                f"the user behind AWS_ACCESS_KEY_ID or AWS_PROFILE, or the bucket's")
    if isinstance(e, PermissionError):
        return f"permission denied: {e}"
    if isinstance(e, FileNotFoundError):
        return f"not found: {e}"
    return f"{name}: {e}"


def exists(url: str, key: str) -> bool:
    """Whether a file or folder is at `url`; a storage that cannot be asked is an error naming `key`."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.info(path)  # not fs.exists: object stores' exists() answers False for every error
        return True
    except FileNotFoundError:
        return False
    except Exception as e:
        raise UserError(f"{key} = {url}: {storage_problem(e)}") from None


def missing_files(urls: list[str], key: str) -> list[str]:
    """The URLs of `urls` where no file is. A folder of a local disk or an
    object store is listed once (thousands of shards cost one listing, not a
    request each); a URL elsewhere (http: pages need not list their files)
    is asked on its own. A storage that cannot be asked is an error naming `key`."""
    folders: dict[tuple, list[str]] = {}
    missing = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if _listable(fs):
            folders.setdefault((fs, path.rpartition("/")[0]), []).append(url)
        elif not exists(url, key):
            missing.append(url)
    for (fs, folder), members in folders.items():
        try:
            present = {p.rstrip("/").rpartition("/")[2] for p in fs.ls(folder, detail=False)}
        except FileNotFoundError:
            present = set()
        except Exception as e:
            raise UserError(f"{key} = {members[0]}: {storage_problem(e)}") from None
        missing += [u for u in members if u.rstrip("/").rpartition("/")[2] not in present]
    return missing


def _listable(fs) -> bool:
    """Whether listing a folder of `fs` names every file in it (local disks,
    fsspec's memory store, object stores), not only what a page links to."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"file", "local", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


def check_writable(url: str, key: str) -> None:
    """A folder or URL where a probe file can be written and removed. A bucket
    must exist already: fsspec would create a misspelt one."""
    fs, path = fsspec.core.url_to_fs(url)
    bucket = path.split("/")[0]
    try:
        if "://" in url and not url.startswith(("file://", "memory://")):  # an object store: the bucket first
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise UserError(f"{key} = {url}: no bucket {bucket!r} there (create it first: make-dist does "
                                f"not create buckets)") from None
        probe = f"{path.rstrip('/')}/.make-dist-probe-{uuid.uuid4().hex}"
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except UserError:
        raise
    except Exception as e:  # a permission, a file in the way, no credentials: each its own type
        raise UserError(f"{key} = {url}: cannot write there ({storage_problem(e)})") from None
