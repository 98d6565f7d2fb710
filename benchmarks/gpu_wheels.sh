#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.py needs on the lent GPU machine into .gpu-wheels/ (git-ignored), which the
# device call carries and benchmarks/gpu_run.sh installs there (that machine reaches no package registry).
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh   # wheels for CPython 3.12 (GPU_PYTHON=3.11: another)
#
# The machine's image has torch, torchvision, timm, huggingface_hub, numpy, PyYAML, regex, tqdm, safetensors,
# einops, h5py, rich, typer, matplotlib, scikit-learn, pillow and opencv; the packages below are what clipspm
# imports beyond those, with the packages they need that the image lacks, at the versions of $PYTHON's environment
# (where the tests pass). PyAV (35 MB) is left out on purpose: on that machine OpenCV writes the benchmark's videos
# and decord reads them, so nothing imports av there.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
version=${GPU_PYTHON:-3.12}
dest=.gpu-wheels
packages=(
  open_clip_torch ftfy wcwidth                                  # the CLIP models; ftfy cleans the prompt texts
  decord                                                        # video decoding
  zarr numcodecs donfig google-crc32c                           # the feature cache
  omegaconf                                                     # run configs
  pydantic pydantic-core annotated-types typing-inspection      # the config schema
  typing-extensions                                             # as new as pydantic needs
)
pins=$("$python" - "${packages[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

pins, missing = [], []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    print(f"{sys.executable} has no {', '.join(missing)}: run this script with the Python of the project's "
          f"environment, e.g. PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh", file=sys.stderr)
    sys.exit(2)
print(" ".join(pins))
EOF
)
rm -rf "$dest"
mkdir -p "$dest"
# shellcheck disable=SC2086  # one argument per pinned requirement
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" $pins
ls -1 "$dest"
size=$(du -cb "$dest"/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f MiB", $1 / 1048576}')
echo "$size in $dest/ for CPython $version"
