#!/usr/bin/env bash
# MONAI Label 0.8.5 in an environment of its own, beside the bundle's: it needs numpy < 2 (pydicom-seg), the bundle
# pins numpy 2.2.6; its transforms import torchvision, and the torchvision that imports beside a CPU torch here is
# 0.29.1 with torch 2.14.1 (a CUDA build, about 5.5 GB). Usage: bash tests/clients/setup_monailabel.sh [VENV]
set -euo pipefail
venv=${1:-.venv-monailabel}
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install -q "numpy<2" monai==1.5.1 monailabel==0.8.5 simpleitk==2.5.7 pytest
