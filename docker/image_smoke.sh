#!/usr/bin/env bash
# Build docker/Dockerfile with podman (no Docker engine on these machines) and smoke-test the image by
# mounting it and running its Gunicorn entrypoint under chroot on loopback: /readyz and one prediction.
# Run as root: `make image-smoke`. Needs Debian's podman and debootstrap; pip inside the build has no
# route to the index, so the image installs from the wheelhouse (`make wheelhouse`).
set -euo pipefail
cd "$(dirname "$0")/.."

PODMAN=(podman --storage-driver vfs)
IMAGE=localhost/bayesnet-cxr:0.1.0
BASE=localhost/debian-py311:bookworm
ROOTFS=/var/tmp/cxr-rootfs
PY=${PY:-.venv/bin/python}

if ! "${PODMAN[@]}" image exists "$BASE"; then
    # A Debian bookworm base (Python 3.11) made locally: the registry of official images is unreachable.
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" >/dev/null
    ln -sf python3 "$ROOTFS/usr/bin/python"
    tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
fi
if ! ls docker/wheelhouse/torch-*.whl >/dev/null 2>&1; then
    "$PY" -m pip wheel --quiet -c constraints.txt ".[serve]" setuptools wheel -w docker/wheelhouse
fi

started=$(date +%s)
# --layers=false: with the vfs driver every cached step would copy the whole 6 GB root filesystem again.
"${PODMAN[@]}" build --isolation chroot --format docker --layers=false -f docker/Dockerfile \
    --build-arg BASE_IMAGE="$BASE" --build-arg OFFLINE=1 -t "$IMAGE" . >/tmp/cxr-image-build.log
build_s=$(( $(date +%s) - started ))
size=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')

root=$("${PODMAN[@]}" image mount "$IMAGE")
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mount --bind /proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
cleanup() {
    [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    umount "$root/tmp" "$root/dev" "$root/proc" 2>/dev/null || true
    "${PODMAN[@]}" image unmount "$IMAGE" >/dev/null || true
}
trap cleanup EXIT

# The image's entrypoint and environment, as the runtime would apply them, as its non-root user.
chroot --userspec=10001:10001 "$root" /usr/bin/env -i \
    PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin HOME=/tmp PYTHONUNBUFFERED=1 \
    CXR_BIND="127.0.0.1:$port" CXR_MODEL_PATH=/models/demo CXR_DEVICE=auto CXR_LOG_LEVEL=WARNING \
    sh -c 'cd /app && exec gunicorn -c /app/gunicorn.conf.py' >/tmp/cxr-image-run.log 2>&1 &
server=$!
for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "the image's server exited:"; tail -n 20 /tmp/cxr-image-run.log; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/readyz"
echo
image=${SMOKE_IMAGE:-../shared/data/originals/00000211_000.png}
[ -f "$image" ] || image=$("$PY" -c 'import data_store; print(data_store.DataStore().get_path("RG1_UNCR.dcm"))')
curl -sf -F "file=@$image" "http://127.0.0.1:$port/v1/predict?cams=auto" \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); print("prediction:", r["model"]["name"], r["model"]["version"], "uncertain:", r["uncertain"], "heatmaps:", list(r["gradcam"]))'
curl -sf "http://127.0.0.1:$port/" | grep -q "<html" && echo "web page: served"
echo "image $IMAGE: $(( size / 1000000 )) MB, built in ${build_s} s"
