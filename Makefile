# The README's two commands are `make demo` and `make test`; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/Shapes-Detection/retina_focal_R_18_FPN_demo.yaml

.PHONY: install demo test

install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG)

test: install
	$(PY) -m pytest -q
