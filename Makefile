# Two entry points for a fresh machine: `make demo` (main experiment) and `make test` (test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
LMC := $(PYTHON) -m lmc_lightning
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO := runs/demo

.PHONY: install data demo test notebooks

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"

# Real Fashion-MNIST, offline, from Debian's package (needs root; skipped when already there).
data:
	@test -f $(FMNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	  || (echo "Install Fashion-MNIST: apt-get install dataset-fashion-mnist (as root)"; exit 1)

# Two Fashion-MNIST MLP endpoints from different seeds, then the loss/accuracy barrier between them,
# before and after weight matching.
demo: install data
	$(LMC) fit --config configs/experiments/fmnist_demo.yaml --model.seed 0 --data.seed 0 \
	  --trainer.logger.init_args.version seed0
	$(LMC) fit --config configs/experiments/fmnist_demo.yaml --model.seed 1 --data.seed 1 \
	  --trainer.logger.init_args.version seed1
	$(LMC) test --config configs/experiments/fmnist_demo_barrier.yaml
	$(LMC) test --config configs/experiments/fmnist_demo_barrier.yaml --model.align weight \
	  --model.output_dir $(DEMO)/barrier_aligned --trainer.logger.init_args.version barrier_aligned
	@$(PYTHON) -c "import json; \
	  [print(f\"{n}: loss barrier {r['loss_barrier']:.4f}, accuracy barrier {r['accuracy_barrier']:.4f}\") \
	   for n in ('barrier', 'barrier_aligned') for r in [json.load(open(f'$(DEMO)/{n}/path.json'))]]"
	@echo "plots: $(DEMO)/barrier/path.png $(DEMO)/barrier_aligned/path.png"

test: install data
	$(PYTHON) -m pytest -q

# Re-execute the example notebooks (examples/*.ipynb) from their percent-format scripts (examples/*.py).
# Small CPU settings (each notebook records them in its metadata, lmc_settings).
notebooks: install data
	LMC_EPOCHS=3 LMC_SUBSET=10000 LMC_PAIRS=1 LMC_DEEP_PAIRS=1 LMC_RECIPES=ours LMC_TEST=2000 LMC_BN_BATCHES=4 \
	  $(PYTHON) examples/build_notebooks.py
