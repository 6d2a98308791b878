"""vLLM's own tests, from the source distribution of the vLLM version installed, fetched at test time.

The repository holds none of vLLM's test files: the sdist is downloaded once into a cache directory (never into
the repository), checked against its pinned SHA-256, and only its ``tests/`` is extracted.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/d5/df/5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/"
    f"vllm-{VLLM_VERSION}.tar.gz"
)
SDIST_SHA256 = "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad"


class SdistError(RuntimeError):
    """The sdist could not be fetched, or is not the pinned file."""


def vllm_tests(cache_dir: Path) -> Path:
    """The directory holding the pinned sdist's ``tests/`` (fetched and extracted on first use)."""
    root = cache_dir / f"vllm-{VLLM_VERSION}"
    done = root / ".extracted"
    if done.exists():
        return root
    archive = _fetch(cache_dir)
    shutil.rmtree(root, ignore_errors=True)
    prefix = f"vllm-{VLLM_VERSION}/tests/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(cache_dir, members=members, filter="data")
    done.touch()
    return root


def _fetch(cache_dir: Path) -> Path:
    archive = cache_dir / f"vllm-{VLLM_VERSION}.tar.gz"
    if archive.exists() and _sha256(archive) == SDIST_SHA256:
        return archive
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".part")
    try:
        with urllib.request.urlopen(SDIST_URL, timeout=120) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        raise SdistError(f"cannot download {SDIST_URL}: {exc}") from exc
    if (digest := _sha256(partial)) != SDIST_SHA256:
        partial.unlink()
        raise SdistError(f"{SDIST_URL} has SHA-256 {digest}, expected {SDIST_SHA256}")
    partial.rename(archive)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
