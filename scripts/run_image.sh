#!/usr/bin/env bash
# Run the segmentation image on a server and wait until it is ready.
#
#   scripts/run_image.sh [IMAGE]          IMAGE defaults to localhost/segmentation:latest
#   HOST=0.0.0.0 PORT=80 CPUS=4 MEMORY=8g NAME=seg scripts/run_image.sh
#
# Loading an exported archive on the server first:  podman load -i segmentation.oci.tar
set -euo pipefail
IMAGE=${1:-localhost/segmentation:latest}
HOST=${HOST:-127.0.0.1} PORT=${PORT:-3000} CPUS=${CPUS:-2} MEMORY=${MEMORY:-6g} NAME=${NAME:-segmentation}
here=$(cd "$(dirname "$0")/.." && pwd)
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
else
  engine=podman
  [ -z "${CONTAINERS_CONF:-}" ] && [ -f "$here/build/containers.conf" ] && export CONTAINERS_CONF="$here/build/containers.conf"
fi
"$engine" rm -f "$NAME" >/dev/null 2>&1 || true
"$engine" run -d --name "$NAME" --pull never -p "$HOST:$PORT:3000" --cpus "$CPUS" --memory "$MEMORY" "$IMAGE" >/dev/null
echo "started $NAME ($IMAGE) with $CPUS CPUs and $MEMORY; waiting for /readyz ..." >&2
for _ in $(seq 1 180); do
  if curl -sf -m 2 "http://127.0.0.1:$PORT/readyz" >/dev/null; then
    echo "ready: http://$HOST:$PORT  (logs: $engine logs $NAME; stop: $engine rm -f $NAME)" >&2
    exit 0
  fi
  if [ "$("$engine" inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" != "true" ]; then
    "$engine" logs "$NAME" 2>&1 | tail -30 >&2
    echo "the container stopped before it was ready" >&2
    exit 1
  fi
  sleep 1
done
echo "not ready after 180 s; last log lines:" >&2
"$engine" logs "$NAME" 2>&1 | tail -30 >&2
exit 1
