# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extras the demo and the tests need (see docs/development.md, "Dependencies").
EXTRAS := dicom,viz,runtime,train,export,test,openvino,ray,sign
# torch is pinned explicitly first: a loose requirement would pull a multi-GB CUDA build onto
# machines without a GPU. Override on a CUDA machine, e.g. `make test TORCH_SPEC="torch>=2.1,<3"`.
TORCH_SPEC ?= torch==2.13.0
# nnU-Net v2, the peer of the benchmarks and the source of imported models, pinned, with its dependencies but
# without timm: dynamic-network-architectures lists timm for its transformer nets, which pocketseg never builds,
# and timm pulls torchvision, whose wheel wants a newer torch than the one pinned above (and would replace it).
NNUNET := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
NNUNET_DEPS := acvl-utils==0.2.6 batchgenerators==0.25.5 blosc2 einops graphviz imagecodecs pandas requests \
	scikit-image scikit-learn seaborn SimpleITK tifffile yacs
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: venv demo test lint-imports docs bench fuzz gpu-wheels gpu-check reference-model clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) '$(TORCH_SPEC)'
	$(PIP) -e '.[$(EXTRAS)]'
	$(PIP) '$(TORCH_SPEC)' $(NNUNET_DEPS)
	$(PIP) --no-deps $(NNUNET)
	@# The torch of TORCH_SPEC must have survived every install above (a CUDA build is several GB).
	$(BIN)/python -c "import sys, torch; spec = '$(TORCH_SPEC)'; want = spec.split('==')[1] if '==' in spec else None; \
	  sys.exit(0 if want is None or torch.__version__.split('+')[0] == want else \
	  f'torch {torch.__version__} replaced {spec}: check the install steps of the Makefile')"
	touch $(STAMP)

# The reference model (docs/reference-model.md): a cascade trained on synthetic phantoms by a fixed, seeded recipe,
# evaluated on 10 held-out phantoms and published into $(REFERENCE) (at most 5 MB, committed). About 1 h 40 min on
# 2 CPU cores with native bf16 (bf16 autocast), an estimated 4 h in fp32 without it, minutes on a CUDA GPU. An interrupted
# run continues.
REFERENCE := models/reference
reference-model: venv
	$(BIN)/python -m pocketseg.benchmarks.reference_model --out build/reference-model --publish $(REFERENCE)

# The demo chain on built-in defaults, CPU only: synthetic data -> two short CPU trainings -> model package
# -> self-training (pseudo labels, Eq. 1 uncertainty) -> predictions for held-out synthetic cases
# -> FLARE evaluation -> efficiency bench -> one Markdown report.
# The demo's own nets train for seconds: they show that training, export and self-training work. Prediction,
# evaluation and the bench use the shipped reference model ($(REFERENCE), trained on phantoms by
# `make reference-model`), so the report shows real numbers. Each step prints a stage line; the long ones show
# progress bars. On a 2-core CPU the whole chain takes well under 20 minutes.
DEMO := demo-output
demo: venv
	@echo "==> [1/10] synthesize a small FLARE-like training set -> $(DEMO)/dataset"
	$(BIN)/pocketseg synth $(DEMO)/dataset --full 3 --partial 2 --unlabeled 1 --seed 0 --slices 120 --preview --workers 2 --overwrite
	@echo "==> [2/10] train the ROI net (roi-cpu preset) -> $(DEMO)/runs/roi"
	rm -rf $(DEMO)/runs
	$(BIN)/pocketseg train $(DEMO)/dataset --stage roi --preset roi-cpu --epochs 2 --iterations 4 --val-every 2 --out $(DEMO)/runs/roi --cache $(DEMO)/cache
	@echo "==> [3/10] train the detail net (detail-cpu preset) -> $(DEMO)/runs/detail"
	$(BIN)/pocketseg train $(DEMO)/dataset --stage detail --preset detail-cpu --epochs 2 --iterations 4 --val-every 2 --out $(DEMO)/runs/detail --cache $(DEMO)/cache
	@echo "==> [4/10] export the model package -> $(DEMO)/model"
	$(BIN)/pocketseg export --roi $(DEMO)/runs/roi --detail $(DEMO)/runs/detail -o $(DEMO)/model --overwrite
	@echo "==> [5/10] self-training: two short pseudo-label rounds, uncertainty, selection, final detail net -> $(DEMO)/selftrain"
	rm -rf $(DEMO)/selftrain
	$(BIN)/pocketseg selftrain $(DEMO)/dataset --work $(DEMO)/selftrain --roi-run $(DEMO)/runs/roi --preset detail-cpu --rounds 2 --epochs 1 --iterations 1 --batch-size 1 --cache $(DEMO)/cache
	@echo "==> [6/10] synthesize held-out cases -> $(DEMO)/heldout"
	$(BIN)/pocketseg synth $(DEMO)/heldout --full 2 --seed 1000 --slices 120 --overwrite
	@echo "==> [7/10] predict the held-out cases with the reference model ($(REFERENCE)) -> $(DEMO)/predictions"
	$(BIN)/pocketseg predict -i $(DEMO)/heldout/imagesTr -o $(DEMO)/predictions -m $(REFERENCE) --statistics --preview --overwrite
	@echo "==> [8/10] evaluate the predictions (FLARE 2023 DSC/NSD) -> $(DEMO)/evaluation"
	$(BIN)/pocketseg evaluate --pred $(DEMO)/predictions --gt $(DEMO)/heldout/labelsTr -o $(DEMO)/evaluation --overwrite
	@echo "==> [9/10] bench the reference model on the CPU: time and memory, cold and warm, two small sizes -> $(DEMO)/bench"
	$(BIN)/pocketseg bench -m $(REFERENCE) -o $(DEMO)/bench --device cpu --sizes 512x512x55,512x512x100 --overwrite
	@echo "==> [10/10] write the report"
	$(BIN)/pocketseg demo-report $(DEMO)/report.md --previews $(DEMO)/dataset/previews --predictions $(DEMO)/predictions --evaluation $(DEMO)/evaluation --bench $(DEMO)/bench --model $(REFERENCE) --overwrite
	@echo "demo report: $(DEMO)/report.md"

# The layers between the rooms (pyproject.toml, [tool.importlinter]); the rooms' links in pocketseg/ let it read the tree.
lint-imports: venv
	$(BIN)/lint-imports

test: venv lint-imports
	$(BIN)/python -m pytest

# docs/cli.md, generated from the parser (tests/test_layers.py fails when it is stale).
docs: venv
	$(BIN)/python -m pocketseg.commands > docs/cli.md

bench: venv
	$(BIN)/python -m pocketseg.benchmarks.nifti_read --out bench-output
	$(BIN)/python -m pocketseg.benchmarks.synth_speed --out bench-output

# The long fuzz run (docs/development.md, "Fuzzing the input edges"); `make test` runs the same properties briefly.
FUZZ_EXAMPLES ?= 2000
fuzz: venv
	$(BIN)/python -m pocketseg.benchmarks.fuzz --examples $(FUZZ_EXAMPLES) $(if $(FUZZ_MODEL),--model $(FUZZ_MODEL))

# The GPU check (docs/development.md, "Checks on a GPU"). A lent GPU machine starts bare and offline and takes at
# most 64 MiB along with the tree: `make gpu-wheels` (here, with network) packs what it lacks into $(GPU_KIT)/carry,
# the folder to carry; `make gpu-check` (there) unpacks it into $(GPU_KIT)/site, which only PYTHONPATH points at,
# and runs every check in one go, with a report in $$OUT (else gpu-check-output). `make gpu-check DRY=1` walks the
# same steps here on the CPU with tiny inputs. PEER=0 leaves the nnU-Net peer out of the kit, CT=1 adds the real CT
# images of CT_EXAMPLES (as many as fit); STEPS=a,b and GPU_CHECK_ARGS="..." pass on to the check.
GPU_KIT    ?= gpu-kit
GPU_PYTHON ?= python3
PEER       ?= 1
CT         ?= 0
CT_EXAMPLES ?= ../shared/data/ct_examples
# What nnU-Net's predictor imports that the GPU machine lacks; unpinned names take the version installed here.
GPU_PEER_DEPS := acvl-utils batchgenerators blosc2 ndindex SimpleITK
GPU_CHECK_FLAGS = --kit $(GPU_KIT) --overwrite $(if $(STEPS),--steps $(STEPS)) $(GPU_CHECK_ARGS)

gpu-wheels: venv
	$(BIN)/python -m pocketseg.benchmarks.gpu_kit wheels --kit $(GPU_KIT) \
	  --peer "$(NNUNET) $(GPU_PEER_DEPS)" $(if $(filter 0,$(PEER)),--no-peer) \
	  $(if $(filter 1,$(CT)),--ct-examples $(CT_EXAMPLES))

ifeq ($(DRY),1)
gpu-check: venv
	PYTHONSAFEPATH=1 $(BIN)/python -m pocketseg.benchmarks.gpu_check --dry-run $(GPU_CHECK_FLAGS)
else
# No venv and no network there: the machine's own Python, with the kit's folder in front on PYTHONPATH only.
# PYTHONSAFEPATH keeps the root's core folder `pocketseg/` from hiding the installed package.
gpu-check:
	PYTHONSAFEPATH=1 $(GPU_PYTHON) benchmarks/gpu_kit.py unpack --kit $(GPU_KIT)
	PYTHONPATH=$(abspath $(GPU_KIT)/site)$(if $(PYTHONPATH),:$(PYTHONPATH)) PYTHONSAFEPATH=1 \
	  $(GPU_PYTHON) -m pocketseg.benchmarks.gpu_check $(GPU_CHECK_FLAGS)
endif

clean:
	rm -rf $(VENV) demo-output bench-output build *.egg-info gpu-check-output
