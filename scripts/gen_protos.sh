#!/usr/bin/env bash
# Regenerates the Python gRPC stubs from protos/ into shared/delf_common/proto/.
# The generated files are committed; run this after editing a .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=shared/delf_common/proto
"$PY" -c "import grpc_tools.protoc" || { echo "grpc_tools missing: run make install first" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/delf/v1/delf.proto
# Make the generated imports absolute inside our package (no top-level 'delf' package).
sed -i 's/^from delf\.v1 import/from delf_common.proto.delf.v1 import/' "$out"/delf/v1/*_grpc.py
touch "$out/__init__.py" "$out/delf/__init__.py" "$out/delf/v1/__init__.py"
echo "generated into $out"
