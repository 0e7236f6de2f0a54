#!/usr/bin/env bash
# Does the board install resolve from binary wheels for a Jetson, without torch and without PyPI's
# CPU onnxruntime? A pip dry run per JetPack (aarch64; Python 3.10 for JetPack 6, 3.12 for 7).
# Usage: scripts/board_install_check.sh [OUT_DIR]   (needs the package registry, not a board)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/board-install}
pip=${PIP:-.venv/bin/pip}
mkdir -p "$out"
wheels=$(mktemp -d)
$pip wheel -q --no-deps --no-build-isolation . -w "$wheels"
wheel=$(ls "$wheels"/fila_deploy-*.whl)
check() {  # name python glibc-minors extras
    local name=$1 python=$2 minors=$3 extras=$4 plats="--platform manylinux2014_aarch64"
    for m in $minors; do plats="$plats --platform manylinux_2_${m}_aarch64"; done
    local cmd="pip install --dry-run --ignore-installed --only-binary=:all: --python-version $python $plats '$(basename "$wheel")[$extras]'"
    $pip install -q --dry-run --ignore-installed --report "$wheels/$name.json" --target "$wheels/t" \
        --only-binary=:all: --python-version "$python" $plats "$wheel[$extras]"
    python3 - "$wheels/$name.json" "$name" "$cmd" <<'PY'
import json, sys
path, name, cmd = sys.argv[1:]
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(path))["install"]}
bad = sorted(set(got) & {"torch", "onnxruntime", "torchvision", "transformers", "timm"})
print(f"{name}: {cmd}")
print("  resolves:", " ".join(f"{k}=={v}" for k, v in sorted(got.items())))
print(f"  numpy {got.get('numpy')}, cuda-python {got.get('cuda-python')}, onnx {got.get('onnx')}")
print("  FAIL: pulls " + ", ".join(bad) if bad else "  ok: no torch, no PyPI onnxruntime")
sys.exit(1 if bad else 0)
PY
}
check jetpack6 3.10 "17 28 31 34 35" runtime,jetpack6 | tee "$out/README.md"
check jetpack7 3.12 "17 28 31 34 35 36 38 39" runtime,jetpack7 | tee -a "$out/README.md"
rm -rf "$wheels"
