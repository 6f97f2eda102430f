#!/usr/bin/env bash
# README command (a): the main job on the embedded defaults, end to end on one machine.
#   1. train the `tiny` preset on the embedded corpus (the Python standard library's
#      sources, BPE tokenizer trained on them), checkpointing to runs/demo
#   2. export the newest checkpoint to a serving bundle (validated, perplexity reported)
#   3. start the gRPC server on 127.0.0.1, wait until its health check says SERVING
#   4. stream a completion over gRPC and print it, then shut the server down (SIGTERM)
# Re-running resumes training from the last checkpoint. STEPS=N changes the length.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STEPS=${STEPS:-200}
PORT=${PORT:-50051}
RUN=runs/demo
BUNDLE=bundles/demo
export TANDEM_LOG_LEVEL=WARNING
tandem=.venv/bin/tandem

echo "== 1/4 train: tiny preset, $STEPS steps -> $RUN"
$tandem train tiny run_dir=$RUN steps="$STEPS" checkpoint_every=100 eval_every=100 log_every=20

echo "== 2/4 export: $RUN -> $BUNDLE"
$tandem export --checkpoint $RUN --out $BUNDLE --overwrite

echo "== 3/4 serve: $BUNDLE on 127.0.0.1:$PORT"
$tandem serve --bundle $BUNDLE --port "$PORT" --max-slots 4 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
.venv/bin/python - "$PORT" <<'PY'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
deadline = time.time() + 300
while True:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Generation"), timeout=2)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    if time.time() > deadline:
        sys.exit("server did not become ready within 300 s")
    time.sleep(0.5)
PY

echo "== 4/4 generate over gRPC"
$tandem generate --target "127.0.0.1:$PORT" --prompt "def main(" --max-tokens 64
echo
echo "== done: stopping the server"
