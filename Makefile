# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extras the demo and the tests need (see README, "Dependencies").
EXTRAS := dicom,viz,runtime,train,export,test
# torch is pinned explicitly first: a loose requirement would pull a multi-GB CUDA build onto
# machines without a GPU. Override on a CUDA machine, e.g. `make test TORCH_SPEC="torch>=2.1,<3"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The demo chain on built-in defaults: synthetic data -> two short CPU trainings -> model package
# -> predictions (labels, statistics, previews) for held-out synthetic cases.
# The demo nets train for seconds, so they show the chain, not accuracy (see README).
DEMO := demo-output
demo: venv
	$(BIN)/pocketseg synth $(DEMO)/dataset --full 3 --partial 2 --unlabeled 1 --seed 0 --slices 120 --preview --workers 2 --overwrite
	rm -rf $(DEMO)/runs
	$(BIN)/pocketseg train $(DEMO)/dataset --stage roi --preset roi-cpu --epochs 2 --iterations 4 --val-every 2 --out $(DEMO)/runs/roi --cache $(DEMO)/cache
	$(BIN)/pocketseg train $(DEMO)/dataset --stage detail --preset detail-cpu --epochs 2 --iterations 4 --val-every 2 --out $(DEMO)/runs/detail --cache $(DEMO)/cache
	$(BIN)/pocketseg export --roi $(DEMO)/runs/roi --detail $(DEMO)/runs/detail -o $(DEMO)/model --overwrite
	$(BIN)/pocketseg synth $(DEMO)/heldout --full 2 --seed 1000 --slices 120 --overwrite
	$(BIN)/pocketseg predict -i $(DEMO)/heldout/imagesTr -o $(DEMO)/predictions -m $(DEMO)/model --statistics --preview --overwrite

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m pocketseg.benchmarks.nifti_read --out bench-output
	$(BIN)/python -m pocketseg.benchmarks.synth_speed --out bench-output

clean:
	rm -rf $(VENV) demo-output bench-output build *.egg-info
