#!/usr/bin/env bash
# The main job on a built-in sample image, with nothing but this project's tools:
# a compute host's image flow (as OpenStack nova runs it with qemu-img today).
#   1. a sample disk is built and packed as a zstd-compressed qcow2 ("the download");
#   2. it is inspected, converted to a sparse raw base (nova's exact convert line) and
#      checked byte for byte against the original;
#   3. an instance disk is created as a qcow2 overlay on the base, resized, written to,
#      and checked for consistency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONSAFEPATH=1
Q=.venv/bin/qcow2
if [ -n "${DEMO_DIR:-}" ]; then
    W=$DEMO_DIR                      # kept for inspection
else
    W=$(mktemp -d -t qcow2-demo.XXXXXX)
    trap 'rm -rf "$W"' EXIT          # set DEMO_DIR to keep the files
fi
mkdir -p "$W"
echo "== building the sample disk in $W"
.venv/bin/python scripts/make_sample.py "$W/sample.raw" >/dev/null
$Q convert -c -O qcow2 -o compression_type=zstd "$W/sample.raw" "$W/image.qcow2"
echo "== qcow2 info (nova's argument order)"
$Q info "$W/image.qcow2" --force-share --output=json -f qcow2
echo "== qcow2 map (first lines)"
$Q map --output=json "$W/image.qcow2" > "$W/map.json"
head -4 "$W/map.json"
echo "== base image: qcow2 convert -t none -O raw -f qcow2 (compressed qcow2 -> sparse raw)"
time $Q convert -p -t none -O raw -f qcow2 "$W/image.qcow2" "$W/base.raw"
cmp "$W/sample.raw" "$W/base.raw"
echo "== identical to the original; disk usage $(du -k "$W/base.raw" | cut -f1) KiB of $(( $(stat -c %s "$W/base.raw") / 1024 )) KiB"
echo "== instance disk: a qcow2 overlay on the base, grown to 1 GiB"
$Q create -f qcow2 -o "backing_file=$W/base.raw,backing_fmt=raw,cluster_size=65536" "$W/disk" 268435456
$Q resize -f qcow2 "$W/disk" 1073741824
.venv/bin/python - "$W/disk" <<'PY'
import sys, qcow2
with qcow2.open(sys.argv[1], "r+") as disk:          # the guest writes a little
    disk.pwrite(b"hello from the guest\n" * 1000, 5 * 1024 * 1024 + 17)
    disk.flush()
PY
$Q check "$W/disk"
$Q info --backing-chain "$W/disk"
$Q compare "$W/sample.raw" "$W/base.raw"
echo "== the compute-host image flow: qcow2 compute spawn (images_type=qcow2), usage, clean --dry-run"
cat > "$W/nova.conf" <<CONF
[DEFAULT]
instances_path = $W/instances
[libvirt]
images_type = qcow2
[image_cache]
remove_unused_original_minimum_age_seconds = 60
CONF
$Q compute spawn --config "$W/nova.conf" --instance 6f1b0a56-3c1e-4c57-9f3e-0d5b8c2a7e11 \
    --image fd0cb2f1-8375-44c9-b1f4-3e1f4c4a8ef0 --source "$W/image.qcow2" --disk-format qcow2 \
    --checksum "sha256:$(sha256sum "$W/image.qcow2" | cut -d' ' -f1)" --root-size 1G --swap-size 16M
cat "$W/instances/6f1b0a56-3c1e-4c57-9f3e-0d5b8c2a7e11/disk.info"; echo
$Q check "$W/instances/6f1b0a56-3c1e-4c57-9f3e-0d5b8c2a7e11/disk"
$Q compare "$W/sample.raw" "$W/instances/6f1b0a56-3c1e-4c57-9f3e-0d5b8c2a7e11/disk"
$Q compute usage --config "$W/nova.conf"
$Q compute clean --config "$W/nova.conf" --dry-run --now $(( $(date +%s) + 86400 ))
$Q compute destroy --config "$W/nova.conf" --instance 6f1b0a56-3c1e-4c57-9f3e-0d5b8c2a7e11
$Q compute clean --config "$W/nova.conf" --dry-run --now $(( $(date +%s) + 86400 ))
