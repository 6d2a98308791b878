"""vLLM's own tests, from the source distribution of the vLLM version installed, fetched at test time.

The repository holds none of vLLM's test files: the sdist is downloaded once into a cache directory (never into
the repository), checked against its pinned SHA-256, and only its ``tests/`` is extracted. One sdist is pinned per
vLLM release the suite has a selection for (``selection.SELECTIONS``).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from pathlib import Path

# version -> (its sdist on the package registry, that file's SHA-256)
SDISTS: dict[str, tuple[str, str]] = {
    "0.32.0": (
        "https://files.pythonhosted.org/packages/d5/df/5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/"
        "vllm-0.32.0.tar.gz",
        "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad",
    ),
    "0.34.0": (
        "https://files.pythonhosted.org/packages/92/21/6e0b077dc4a0b28f5a8ce8bb352a38d7196650d681fd4faa87f8dc622eff/"
        "vllm-0.34.0.tar.gz",
        "fcad848b246a9d8652b47e6425af92334dc02492f9802720f54e27b823cf0113",
    ),
}


class SdistError(RuntimeError):
    """The sdist could not be fetched, or is not the pinned file."""


def vllm_tests(cache_dir: Path, version: str) -> Path:
    """The directory holding the pinned sdist's ``tests/`` of vLLM ``version`` (fetched and extracted on first use)."""
    if version not in SDISTS:
        raise SdistError(f"no vLLM sdist is pinned for {version} (pinned: {', '.join(SDISTS)})")
    root = cache_dir / f"vllm-{version}"
    done = root / ".extracted"
    if done.exists():
        return root
    archive = _fetch(cache_dir, version)
    shutil.rmtree(root, ignore_errors=True)
    prefix = f"vllm-{version}/tests/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(cache_dir, members=members, filter="data")
    done.touch()
    return root


def _fetch(cache_dir: Path, version: str) -> Path:
    url, sha256 = SDISTS[version]
    archive = cache_dir / f"vllm-{version}.tar.gz"
    if archive.exists() and _sha256(archive) == sha256:
        return archive
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        raise SdistError(f"cannot download {url}: {exc}") from exc
    if (digest := _sha256(partial)) != sha256:
        partial.unlink()
        raise SdistError(f"{url} has SHA-256 {digest}, expected {sha256}")
    partial.rename(archive)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
