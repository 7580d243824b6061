# Two commands: `make demo` (set up and launch the app) and `make test` (set up and run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= auto
ARGS ?=
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup demo test bench wheels

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) app.py --model $(MODEL) $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q tests $(ARGS)

bench: setup
	OMP_NUM_THREADS=2 $(PY) bench/guidance_cost.py --quick

# The pure-Python wheels the GPU machine of the device tool lacks (it has torch, not diffusers), for
# bench/gpu_compile.sh: carry .whl there.
wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		"diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')"
