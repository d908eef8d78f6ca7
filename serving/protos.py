"""Generates the Python stubs of the gRPC API from ``proto/`` (reproducibly, with grpcio-tools).

``python -m dgserve.serving.protos`` rewrites ``proto/dgserve/v1/dgserve_pb2{,_grpc}.py`` (+ ``.pyi``)
next to the ``.proto``. The stubs are compiled with ``-Iproto`` so they import as ``dgserve.v1.*``
(setup.py maps ``dgserve.v1`` to ``proto/dgserve/v1``): the same import path works in the router,
in Ray workers and in clients. ``tests/serving/test_protos.py`` fails while they drift.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("dgserve/v1/dgserve.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    return [f[: -len(".proto")] + s for f in PROTO_FILES for s in GENERATED_SUFFIXES]


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every file of PROTO_FILES into ``out_dir`` (same relative layout); return the files written."""
    from grpc_tools import protoc  # imported here: only needed when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTO_FILES]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return [out_dir / name for name in generated_names()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp), args.proto_root):
            dest = args.proto_root / path.relative_to(tmp)
            shutil.copyfile(path, dest)
            print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
