"""Fetch the public files of a registry dataset (or of a teacher's weights): resumable, verified, safely extracted.

``download_dataset(entry, folder)`` fetches ``entry.files`` into ``folder`` and unpacks them; the copy's root is
``folder / entry.download_root``. A file is written as ``<name>.part``, resumed with an HTTP Range request after a
cut, and renamed to ``<name>`` only when its checksum matches the published one; archives are checked member by
member before anything is written, unpacked into a temporary folder and then moved into place. When everything is in
place, ``folder/.evpretrain-download.json`` (``MARKER``) records the files and their digests: a later call that finds
it makes no request. pooch (the field's usual fetcher) cannot resume: its downloaders fetch the whole file again on
every attempt under a new temporary name, so the transfer here is a small Range-aware loop and pooch hashes.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from evpretrain.files import write_text_atomic

if TYPE_CHECKING:
    from evpretrain.data.registry import DatasetEntry

LOG = logging.getLogger(__name__)
MARKER = ".evpretrain-download.json"  # written last: its presence means the download folder is complete
ARCHIVES = "archives"  # sub-folder of the download folder that keeps the verified archives

HEX_DIGITS = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class Extract:
    """What to do with a downloaded file: unpack it (``zip`` | ``tar``, any compression) into ``into``, a folder
    relative to the download folder, or place it there as it is (``none``). ``nested`` is a glob, relative to
    ``into``, of archives inside this one: each is unpacked where it lies and then removed."""

    into: str = "."
    format: Literal["zip", "tar", "none"] = "none"
    nested: str = ""

    def __post_init__(self):
        if Path(self.into).is_absolute() or ".." in Path(self.into).parts:
            raise ValueError(f"extract.into must be a folder inside the download folder, got {self.into!r}")
        if self.nested and self.format == "none":
            raise ValueError("extract.nested needs an archive (format zip or tar)")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset's public release: its address, its published checksum (``md5`` or ``sha256``, hex),
    its size in bytes where known, the name it is saved under (also its name under a mirror's base URL)."""

    url: str
    name: str
    md5: str = ""
    sha256: str = ""
    size: int | None = None
    extract: Extract = field(default_factory=Extract)

    def __post_init__(self):
        if not self.url.startswith(("https://", "http://")):
            raise ValueError(f"url must be an http(s) address, got {self.url!r}")
        if not self.name or Path(self.name).name != self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain file name, got {self.name!r}")
        given = [a for a in HEX_DIGITS if getattr(self, a)]
        if len(given) != 1:
            raise ValueError(f"{self.name}: give exactly one published checksum, md5 or sha256 (got {given or 'none'})")
        digest = getattr(self, given[0])
        if len(digest) != HEX_DIGITS[given[0]] or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{self.name}: {given[0]} must be {HEX_DIGITS[given[0]]} lower-case hex digits")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"{self.name}: size must be a positive number of bytes, got {self.size}")

    @property
    def algorithm(self) -> str:
        return "md5" if self.md5 else "sha256"

    @property
    def digest(self) -> str:
        return self.md5 or self.sha256


# Weights a teacher loads from a local file (pretrain.teacher.weights), with the publisher's checksum.
WEIGHTS = {
    # OpenAI's address carries the file's sha256 as its last folder, which clip.load checks (open_clip 3.3.0,
    # open_clip/pretrained.py:233 and :800, the same _MODELS as github openai/CLIP clip/clip.py).
    "clip_vit_b16": RemoteFile(
        url="https://openaipublic.azureedge.net/clip/models/"
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        name="ViT-B-16.pt",
        sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    ),
}
WEIGHTS_OTHER_WAYS = {
    "clip_vit_b16": "open_clip.create_model_and_transforms('ViT-B-16', pretrained='openai') downloads the same file "
    "into its cache (~/.cache/clip); point pretrain.teacher.weights at it.",
}


class DownloadError(RuntimeError):
    """A file could not be fetched, did not verify, or an archive was unsafe; the message says what to do."""


@dataclass(frozen=True)
class Retry:
    """Bounded retries of a transfer: ``attempts`` in all, waiting ``backoff_s`` x 2^k seconds after the k-th
    failure; ``timeout_s`` is the socket timeout of one request."""

    attempts: int = 6
    backoff_s: float = 2.0
    timeout_s: float = 60.0


def download_dataset(
    entry: DatasetEntry,
    folder: str | Path,
    *,
    mirror: str | None = None,
    retry: Retry = Retry(),
    progress: bool | None = None,
) -> Path:
    """Fetch and unpack ``entry.files`` into ``folder``; return the copy's root (``folder / entry.download_root``).

    ``mirror``: a base URL that serves the files under their names, used instead of the registry's addresses.
    ``progress``: a bar (True), a log line per ~10 % (False), or a bar only when stderr is a terminal (None).
    """
    folder = Path(folder)
    if not entry.files:
        raise DownloadError(manual_steps(entry, folder) + f" Or set data.roots.{entry.name} to where your copy is.")
    download_files(entry.name, entry.files, folder, other_ways=entry.other_ways, mirror=mirror, retry=retry,
                   progress=progress)  # fmt: skip
    return folder / entry.download_root


def manual_steps(entry: DatasetEntry, folder: str | Path) -> str:
    """What to do for a dataset without public files: the registry's steps and the folder to put the copy in."""
    return (
        f"{entry.name} has no direct download (the publisher asks for a form or a request, or publishes no "
        f"checksum). Obtain it yourself: {entry.other_ways} Put the copy in {Path(folder).resolve()} (that folder is "
        f"--root; `evpretrain data verify --dataset {entry.name} --root {folder}` says what it lacks)."
    )


def download_weights(name: str, folder: str | Path, **kwargs) -> Path:
    """Fetch the teacher weights ``name`` (a key of ``WEIGHTS``) into ``folder``; return the file's path."""
    if name not in WEIGHTS:
        raise DownloadError(f"unknown weights {name!r}; known: {sorted(WEIGHTS)}")
    download_files(name, [WEIGHTS[name]], Path(folder), other_ways=WEIGHTS_OTHER_WAYS[name], **kwargs)
    return Path(folder) / WEIGHTS[name].name


def download_files(
    name: str,
    files: list[RemoteFile],
    folder: Path,
    *,
    other_ways: str = "",
    mirror: str | None = None,
    retry: Retry = Retry(),
    progress: bool | None = None,
) -> dict:
    """Fetch, verify and unpack ``files`` into ``folder``, then write the marker; return the marker's record.

    Idempotent: when the marker lists the same files and digests, nothing is fetched (no request is made).
    """
    record = {"name": name, "files": [{"name": f.name, f.algorithm: f.digest, "url": f.url} for f in files]}
    marker = folder / MARKER
    if marker.is_file() and _same_files(json.loads(marker.read_text()), record):
        LOG.info("%s: complete in %s (%s)", name, folder, MARKER)
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() if progress is None else progress
    for spec in files:
        url = f"{mirror.rstrip('/')}/{spec.name}" if mirror else spec.url
        archive = spec.extract.format != "none"
        into = folder / spec.extract.into
        path = fetch_file(spec, url, (folder / ARCHIVES if archive else into) / spec.name, other_ways, retry, progress)
        if archive:
            extract(path, into, spec.extract, scratch=folder)
    for item, spec in zip(record["files"], files):
        item["size"] = spec.size or _size_on_disk(folder, spec)
    write_text_atomic(marker, json.dumps(record, indent=1) + "\n")
    return record


def fetch_file(spec: RemoteFile, url: str, dest: Path, other_ways: str, retry: Retry, progress: bool) -> Path:
    """``dest`` holding ``spec``'s verified bytes: kept when already verified, else fetched (resumed) and checked."""
    if _verified(dest, spec):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _transfer(url, part, spec.size, other_ways, retry, progress)
    actual = _hash(part, spec.algorithm)
    if actual != spec.digest:
        # A wrong file cannot be repaired by resuming it: removed, so that the next attempt starts clean.
        part.unlink()
        raise DownloadError(
            f"{spec.name}: checksum mismatch for {url}: expected {spec.algorithm} {spec.digest}, got {actual}. The "
            f"file was removed and nothing was extracted; a rerun fetches it again. If it keeps happening the "
            f"server's copy differs from the published one: {other_ways}"
        )
    os.replace(part, dest)
    _remember_verified(dest, spec)
    return dest


def _transfer(url: str, part: Path, size: int | None, other_ways: str, retry: Retry, progress: bool) -> None:
    """Append ``url``'s bytes to ``part`` from its current length on, with bounded retries."""
    last_error: Exception | None = None
    for attempt in range(retry.attempts):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "evpretrain", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urlopen(Request(url, headers=headers), timeout=retry.timeout_s) as response:
                if have and response.status != 206:  # the server ignored the range: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                with (
                    part.open("ab" if have else "wb") as out,
                    _Progress(part.name.removesuffix(".part"), total, have, progress) as bar,
                ):
                    while block := response.read(1 << 20):
                        out.write(block)
                        bar.update(len(block))
            if total is None or part.stat().st_size >= total:
                return
            last_error = DownloadError(f"connection closed at {part.stat().st_size} of {total} bytes")
        except HTTPError as err:
            if err.code == 416 and have:  # nothing after what we have: the part is whole (its checksum decides)
                return
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(
                    f"{url}: HTTP {err.code} {err.reason}. The address may have moved; other ways to obtain "
                    f"the data: {other_ways}"
                ) from err
            last_error = err
        except (URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut mid-file
            last_error = err
        if attempt + 1 < retry.attempts:
            wait = retry.backoff_s * 2**attempt
            LOG.warning("%s: %s; retrying in %.0f s (%d/%d)", url, last_error, wait, attempt + 1, retry.attempts)
            time.sleep(wait)
    raise DownloadError(
        f"{url}: failed after {retry.attempts} attempts ({last_error}); a rerun resumes from the "
        f"{part.stat().st_size if part.exists() else 0} bytes kept in {part}. Other ways to obtain the data: "
        f"{other_ways}"
    )


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line every 10 % of the file or every 30 s."""

    def __init__(self, name: str, total: int | None, initial: int, bar: bool):
        self.name, self.total, self.done, self.bar = name, total, initial, None
        self.next_fraction, self.last_time = 0.1, time.monotonic()
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        fraction = self.done / self.total if self.total else 0.0
        if fraction >= self.next_fraction or time.monotonic() - self.last_time >= 30:
            LOG.info("%s: %.1f MB%s", self.name, self.done / 1e6, f" ({fraction:.0%})" if self.total else "")
            self.next_fraction = (int(fraction * 10) + 1) / 10
            self.last_time = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _hash(path: Path, algorithm: str) -> str:
    import pooch  # imported on use: the CLI imports this module for DownloadError

    return pooch.file_hash(str(path), alg=algorithm)


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _remember_verified(path: Path, spec: RemoteFile) -> None:
    """Cache the verification, keyed by size and mtime, so that a 20 GB archive is not hashed again."""
    info = path.stat()
    _sidecar(path).write_text(
        json.dumps({"size": info.st_size, "mtime_ns": info.st_mtime_ns, spec.algorithm: spec.digest})
    )


def _verified(path: Path, spec: RemoteFile) -> bool:
    """Whether ``path`` holds the published bytes; a file there that does not is removed."""
    if not path.is_file():
        return False
    info = path.stat()
    try:
        cached = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        cached = {}
    if cached == {"size": info.st_size, "mtime_ns": info.st_mtime_ns, spec.algorithm: spec.digest}:
        return True
    if _hash(path, spec.algorithm) == spec.digest:
        _remember_verified(path, spec)
        return True
    LOG.warning("%s: does not match its published %s; fetching it again", path, spec.algorithm)
    path.unlink()
    return False


def _same_files(found: dict, expected: dict) -> bool:
    def key(record):
        return [{k: v for k, v in item.items() if k in ("name", "md5", "sha256")} for item in record.get("files", [])]

    return found.get("name") == expected["name"] and key(found) == key(expected)


def _size_on_disk(folder: Path, spec: RemoteFile) -> int:
    where = folder / ARCHIVES if spec.extract.format != "none" else folder / spec.extract.into
    return (where / spec.name).stat().st_size


# --- safe extraction --------------------------------------------------------------------------------------------


def check_members(archive: Path, format: str) -> list[str]:
    """The member names of ``archive``; raises DownloadError, before anything is written, when one is absolute,
    climbs out with ``..``, or is a link or a device (tar) or a symlink (zip)."""
    problems, names = [], []
    if format == "zip":
        with zipfile.ZipFile(archive) as archive_file:
            for info in archive_file.infolist():
                names.append(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    problems.append(f"{info.filename} (a symbolic link)")
    else:
        with tarfile.open(archive) as archive_file:
            for member in archive_file.getmembers():
                names.append(member.name)
                if not (member.isfile() or member.isdir()):
                    problems.append(f"{member.name} (a link or a device, not a file or a folder)")
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
            problems.append(f"{name} (an absolute path)")
        elif ".." in parts:
            problems.append(f"{name} (leads outside the folder with '..')")
    if problems:
        raise DownloadError(f"{archive}: unsafe archive, nothing was extracted: {'; '.join(problems)}")
    return names


def extract(archive: Path, into: Path, spec: Extract, *, scratch: Path) -> None:
    """Unpack ``archive`` into ``into`` through a temporary folder under ``scratch`` (same file system), then the
    archives that ``spec.nested`` matches under ``into``, each where it lies (and removed once unpacked)."""
    _extract_one(archive, into, spec.format, scratch)
    if spec.nested:
        for inner in sorted(into.glob(spec.nested)):
            _extract_one(inner, inner.parent, "zip" if inner.suffix == ".zip" else "tar", scratch)
            inner.unlink()


def _extract_one(archive: Path, into: Path, format: str, scratch: Path) -> None:
    check_members(archive, format)
    temporary = scratch / f".extracting-{archive.name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    if format == "zip":
        with zipfile.ZipFile(archive) as archive_file:
            archive_file.extractall(temporary)
    else:
        with tarfile.open(archive) as archive_file:
            archive_file.extractall(temporary, filter="data")
    into.mkdir(parents=True, exist_ok=True)
    for entry in sorted(temporary.iterdir()):
        target = into / entry.name
        if target.is_dir() and not target.is_symlink():  # left by an interrupted earlier extraction
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    temporary.rmdir()
