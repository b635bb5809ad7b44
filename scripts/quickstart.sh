#!/usr/bin/env bash
# The quickstart in one command, on a fresh machine with Python (no compiler needed): install, then fine-tune
# the bundled SmolLM2-135M-Instruct on the demo data and print the before/after answers (written under ./runs).
# Arguments go to `lightning-lora fit` (e.g. --trainer.precision bf16-true on a GPU).
source "$(dirname "$0")/_install.sh" demo
lightning-lora fit --config "$ROOT/configs/quickstart.yaml" "$@"
