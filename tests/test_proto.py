"""The generated protobuf code in proto/ matches the .proto files it was generated from."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path):
    package = tmp_path / "edgeswarm" / "proto"  # generated as scripts/gen_proto.sh does: modules of edgeswarm.proto
    shutil.copytree(ROOT / "proto", package, ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    protos = sorted(str(path.relative_to(tmp_path)) for path in package.glob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=."]
    subprocess.run([*command, *protos], cwd=tmp_path, check=True)
    for generated in sorted(package.glob("*_pb2*.py*")):
        committed = ROOT / "proto" / generated.name
        assert committed.read_text() == generated.read_text(), f"{generated.name} is stale: run scripts/gen_proto.sh"
