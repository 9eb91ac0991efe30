# Two commands for a new user: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo
# On a shared machine, OpenMP threads that spin while they wait starve the other process's threads:
# the demo's tiny-model epochs went from 0.7 s to 17 s next to one busy neighbour, and stay at ~1 s
# with passive waiting, which costs the large matrix multiplies nothing (benchmarks/README.md).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test bench figures clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The whole notebook on the synthetic demo data: offline, CPU, tiny random models.
demo: install
	mkdir -p $(DEMO_OUT)
	$(PY) -m papermill entrep-prototypical.ipynb $(DEMO_OUT)/entrep-prototypical.ipynb \
		-f configs/demo.yaml -p output_dir $(DEMO_OUT)
	@echo "Demo written to $(DEMO_OUT): metrics.json, figures/, submission*.zip (synthetic data)"

test: install
	$(PY) -m pytest -q tests

# Speed of embedding, decoding, fine-tuning, the demo and retrieval (README.md "Performance").
bench: install
	$(PY) benchmarks/bench.py --out outputs/benchmark.json --markdown outputs/benchmark.md

# The images README.md shows, regenerated from a demo run.
figures: demo
	cp $(DEMO_OUT)/figures/samples_per_class.png $(DEMO_OUT)/figures/retrieval_gallery_i2i.png \
		$(DEMO_OUT)/figures/confusion_fine_hybrid.png figures/

clean:
	rm -rf outputs .pytest_cache
