#!/usr/bin/env bash
# The main job on a built-in sample image: set up, build a sample disk, then let the
# engine describe it, map it and convert it back to a sparse raw file, checked byte for
# byte against the original.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONSAFEPATH=1
Q=.venv/bin/qcow2
W=${DEMO_DIR:-$(mktemp -d -t qcow2-demo.XXXXXX)}
echo "== building the sample in $W"
.venv/bin/python scripts/make_sample.py "$W/sample.raw" >/dev/null
# Until the engine's own writer lands (issue 3), the compressed sample is made by qemu-img.
qemu-img convert -c -O qcow2 -o compression_type=zstd "$W/sample.raw" "$W/sample.qcow2"
echo "== qcow2 info $W/sample.qcow2"
$Q info "$W/sample.qcow2"
echo "== qcow2 map (first lines)"
$Q map "$W/sample.qcow2" --output=json | head -5
echo "== qcow2 convert -O raw (zstd-compressed qcow2 -> sparse raw)"
time $Q convert -p -O raw "$W/sample.qcow2" "$W/out.raw"
cmp "$W/sample.raw" "$W/out.raw"
echo "== identical to the original; disk usage: $(du -k "$W/out.raw" | cut -f1) KiB of $(( $(stat -c %s "$W/out.raw") / 1024 )) KiB"
