#!/usr/bin/env bash
# Regenerates the Python stubs next to each .proto file (they are committed, so an
# install needs no grpcio-tools): bash proto/generate.sh
# Paths are taken from the repository root, so the stubs import each other as
# `proto.tandem...`, apart from the public `tandem` package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    $(find proto -name '*.proto')
