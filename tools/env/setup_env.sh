#!/usr/bin/env bash
# Create (once) and print the path of a virtual environment for mmfuse.
#
# Usage: bash tools/env/setup_env.sh {core|full}
#
# The environment lives outside the checkout, under
# ${MMFUSE_ENV_ROOT:-~/.cache/mmfuse}, keyed by a hash of this script and the
# requirement file, so a fresh clone reuses it and a changed requirement
# builds a new one.  Progress goes to stderr; stdout is only the venv path.
set -euo pipefail
kind=${1:-full}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req="$here/requirements-$kind.txt"
[ -f "$req" ] || { echo "setup_env: unknown environment '$kind'" >&2; exit 2; }
key=$(cat "$0" "$req" | sha256sum | cut -c1-12)
root=${MMFUSE_ENV_ROOT:-$HOME/.cache/mmfuse}
venv="$root/venv-$kind-$key"
if [ -f "$venv/.complete" ]; then
  echo "$venv"
  exit 0
fi
mkdir -p "$root"
exec 9>"$root/.lock-$kind"
flock 9
if [ -f "$venv/.complete" ]; then echo "$venv"; exit 0; fi
log() { echo "[setup_env] $*" >&2; }
rm -rf "$venv"
python3.11 -m venv "$venv" >&2 || python3 -m venv "$venv" >&2
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q 'pip<25' 'setuptools<70' wheel >&2
torch_pin=$(grep -E '^torch==' "$req")
log "installing $torch_pin"
"${pip[@]}" install -q $(grep -E '^torch(vision)?==' "$req") >&2
if [ "$kind" = full ]; then
  # mmcv 2.0.1 with ops, built from its sdist with C++20 (torch 2.14 headers
  # need it).  The built wheel is cached beside the venvs.
  wheels="$root/wheels"
  mkdir -p "$wheels"
  if ! ls "$wheels"/mmcv-2.0.1-*.whl >/dev/null 2>&1; then
    log 'building mmcv 2.0.1 from source (about 12 minutes on 2 cores)'
    build=$(mktemp -d)
    "${pip[@]}" install -q ninja 'setuptools<70' wheel >&2
    "${pip[@]}" download -q --no-deps --no-binary :all: \
      --no-build-isolation -d "$build" mmcv==2.0.1 >&2
    tar -xzf "$build"/mmcv-2.0.1.tar.gz -C "$build"
    sed -i 's/-std=c++14/-std=c++20/g' "$build/mmcv-2.0.1/setup.py"
    grep -q 'c++20' "$build/mmcv-2.0.1/setup.py"
    (cd "$build/mmcv-2.0.1" && MAX_JOBS=2 MMCV_WITH_OPS=1 FORCE_CUDA=0 \
      PATH="$venv/bin:$PATH" \
      "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$build/out" . \
      >&2)
    mv "$build"/out/mmcv-2.0.1-*.whl "$wheels/"
    rm -rf "$build"
  fi
  "${pip[@]}" install -q --no-deps "$wheels"/mmcv-2.0.1-*.whl >&2
  log 'installing xtcocotools from source (its wheel needs numpy 1)'
  "${pip[@]}" install -q "$(grep -E '^numpy==' "$req")" cython >&2
  "${pip[@]}" install -q --no-build-isolation --no-binary xtcocotools \
    xtcocotools >&2
  log 'installing the OpenMMLab codebases and their dependencies'
  # The codebases pin loose ranges (chumpy, mmcv<2.1 checks...): install
  # them without dependencies and their real dependencies explicitly.
  grep -vE '^(#|$|torch|mm)' "$req" | xargs "${pip[@]}" install -q >&2
  grep -E '^mm' "$req" | xargs "${pip[@]}" install -q --no-deps >&2
else
  grep -vE '^(#|$|torch==)' "$req" | grep -v '^mm' \
    | xargs -r "${pip[@]}" install -q >&2
  grep -E '^mm' "$req" | xargs "${pip[@]}" install -q >&2
fi
touch "$venv/.complete"
log "ready: $venv"
echo "$venv"
