#!/usr/bin/env bash
# Regenerate exo/networking/grpc/node_service_pb2{,_grpc}.py{,i} from node_service.proto.
#
# The proto is compiled with the repository root as the include path, so the generated
# gRPC module imports its messages package-absolutely:
#   from exo.networking.grpc import node_service_pb2 as ...
# Needs grpcio-tools (pip install grpcio-tools). Run from anywhere.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" -m grpc_tools.protoc \
  --proto_path=. \
  --python_out=. \
  --pyi_out=. \
  --grpc_python_out=. \
  exo/networking/grpc/node_service.proto

# Fail loudly if the import form ever changes (e.g. a different protoc invocation).
grep -q '^from exo.networking.grpc import node_service_pb2' exo/networking/grpc/node_service_pb2_grpc.py \
  || { echo "compile_proto.sh: unexpected import in node_service_pb2_grpc.py" >&2; exit 1; }
echo "regenerated exo/networking/grpc/node_service_pb2{.py,.pyi,_grpc.py}"
