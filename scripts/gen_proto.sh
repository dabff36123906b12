#!/usr/bin/env bash
# Regenerates the Python code for every .proto file in proto/ (run from anywhere), as modules of
# edgeswarm.proto (edgeswarm/proto links to proto/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. edgeswarm/proto/*.proto
