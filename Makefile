# The README's two commands are `make demo` and `make test`; both set up .venv first.
# `make bench` races RetinaFocal against detectron2's RetinaNet (tools/benchmark.py).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml

.PHONY: install demo test bench

install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG)

bench: install
	$(PY) tools/benchmark.py --output-dir output/benchmark

test: install
	$(PY) -m pytest -q
