# The README's two commands are `make demo` and `make test`; both set up .venv first.
# `make demo` fine-tunes ImageNet MobileNetV2; `make demo-scratch` trains the ResNet-18 from scratch.
# `make test-fast` leaves out the tests marked slow (the edit loop; `make test` runs all).
# `make bench` races RetinaFocal against detectron2's RetinaNet (tools/benchmark.py);
# `make gpu-check` runs the checks that need CUDA (tools/gpu_check.py; exits 0 without CUDA; <= 8 min,
# GPU_CHECK_OPTS=--quick <= 3 min). Where torch and detectron2 are already installed and nothing
# can be downloaded: `make -o install gpu-check PY=python3`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/Shapes-Detection/retina_focal_MobileNetV2_FPN_demo.yaml
SCRATCH_DEMO_CONFIG := configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml
DEMO_OPTS ?=
GPU_CHECK_OPTS ?=

.PHONY: install demo demo-scratch test test-fast bench gpu-check

install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG) $(DEMO_OPTS)

demo-scratch: install
	$(PY) tools/demo.py --config-file $(SCRATCH_DEMO_CONFIG) $(DEMO_OPTS)

bench: install
	$(PY) tools/benchmark.py --output-dir output/benchmark

gpu-check: install
	$(PY) tools/gpu_check.py --output-dir output/gpu_check $(GPU_CHECK_OPTS)

test: install
	$(PY) -m pytest -q

# The edit loop: every test except those marked slow (end-to-end training runs, exports, wheels).
test-fast: install
	$(PY) -m pytest -q -m "not slow"
