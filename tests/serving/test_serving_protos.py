"""The committed gRPC stubs are exactly what grpcio-tools generates from proto/ (no drift)."""

from __future__ import annotations

from pathlib import Path

from dgserve.serving import protos


def test_committed_stubs_match_the_proto(tmp_path: Path):
    written = protos.generate(tmp_path)
    assert written, "nothing generated"
    for path in written:
        committed = protos.PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `python -m dgserve.serving.protos`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} differs from the .proto: run `python -m dgserve.serving.protos` and commit")


def test_drift_is_detected(tmp_path: Path):
    """The comparison above can fail: a changed .proto gives different stubs."""
    root = tmp_path / "root"
    src = protos.PROTO_ROOT / protos.PROTO_FILES[0]
    (root / src.parent.relative_to(protos.PROTO_ROOT)).mkdir(parents=True)
    changed = src.read_text().replace("string request_id = 11;", "string request_id = 11;\n  bool extra = 99;")
    (root / protos.PROTO_FILES[0]).write_text(changed)
    a = protos.generate(tmp_path / "a")
    b = protos.generate(tmp_path / "b", proto_root=root)
    assert a[0].read_bytes() != b[0].read_bytes()


def test_stubs_import_under_the_package_path():
    from dgserve.v1 import dgserve_pb2, dgserve_pb2_grpc

    assert dgserve_pb2.DESCRIPTOR.package == "dgserve.v1"
    assert hasattr(dgserve_pb2_grpc, "add_DGServeServicer_to_server")
    req = dgserve_pb2.GenerateRequest(prompt="hi", routing=dgserve_pb2.GenerateRequest.DIFFUSION_ONLY)
    assert dgserve_pb2.GenerateRequest.FromString(req.SerializeToString()) == req
