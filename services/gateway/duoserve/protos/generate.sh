#!/usr/bin/env bash
# Regenerates the *_pb2.py / *_pb2.pyi next to each .proto here (commit the output).
# The protos import each other as "duoserve/protos/x.proto" with services/gateway as the include
# root, so protoc writes package-absolute imports (`from duoserve.protos import x_pb2`) itself.
# Needs grpcio-tools (the dev extra); the gateway at runtime needs only protobuf.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"   # services/gateway
python="${PYTHON:-python}"
cd "$root"
"$python" -m grpc_tools.protoc -I "$root" --python_out="$root" --pyi_out="$root" \
  duoserve/protos/*.proto
echo "generated: $(ls duoserve/protos/*_pb2.py | xargs -n1 basename | tr '\n' ' ')"
