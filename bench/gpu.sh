#!/usr/bin/env bash
# The GPU figures in one run (bench/gpu.py): generation, fit, train-base, the fraction of the bf16
# matmul peak, a correctness pass; one JSON file and a table. See docs/benchmarks.md, "On a GPU".
#
#   bash bench/gpu.sh [--wheels DIR] [--out FILE] [--budget SECONDS] [--stages a,b] [--dry-run]
#
# --wheels DIR (or CTRLORA_WHEELS=DIR): install the wheels in DIR first, offline and without their
# dependencies: for a machine that has torch, peft, transformers, safetensors, typer, rich and
# huggingface_hub but not diffusers or platformdirs. Make DIR where pip can reach PyPI with
#   python3 -m pip download --no-deps -d DIR diffusers==0.42.1 platformdirs
# --dry-run: on the CPU at a tiny size, to check the plumbing (tests/test_gpu_bench.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."

wheels="${CTRLORA_WHEELS:-}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "error: --wheels needs a folder" >&2; exit 2; }; wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

python="${PYTHON:-python3}"
if [ -n "$wheels" ]; then
  shopt -s nullglob
  files=("$wheels"/*.whl)
  shopt -u nullglob
  if [ ${#files[@]} -eq 0 ]; then
    echo "error: no wheels in '$wheels'; make them with: python3 -m pip download --no-deps -d '$wheels' diffusers platformdirs" >&2
    exit 2
  fi
  "$python" -m pip install --quiet --no-index --no-deps --no-cache-dir --disable-pip-version-check "${files[@]}"
fi
if ! "$python" -c "import diffusers, platformdirs" 2>/dev/null; then
  echo "error: diffusers or platformdirs is missing; bring them as wheels: --wheels DIR (see the top of $0)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$python" bench/gpu.py ${args[@]+"${args[@]}"}
