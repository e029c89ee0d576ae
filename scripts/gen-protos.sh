#!/usr/bin/env bash
# Regenerates common/pb/ from protos/. The generator versions are pinned in
# requirements-gen.txt; `make protos` runs this, and tests/unit/test_protos.py
# fails when the committed output differs from a fresh run.
set -euo pipefail
out=${1:-.}
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Icommon/pb=protos \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/deviceplugin/v1beta1/api.proto \
  protos/pluginregistration/v1/api.proto \
  protos/dra/v1/api.proto protos/dra/v1beta1/api.proto \
  protos/drahealth/v1alpha1/api.proto
