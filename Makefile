# One command to set up and run the tests, one to set up and run the main job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>") for a GPU build.
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared/data
DEMO_OUT ?= outputs/demo-sst2-w4a8

.PHONY: setup test test-slow test-all demo reproduce

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test,assets,onnx]"
	touch $@

setup: $(VENV)/.installed

# The suite without its slow tests (about 11 minutes on 2 CPU cores); test-slow runs the rest.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q

# Every number of the README's results tables (quick budget: about 80 minutes on 2 CPU cores).
reproduce: setup
	bash scripts/reproduce_results.sh --budget quick outputs/reproduce

demo: setup
	$(BIN)/python run_glue.py --model_name_or_path $(SHARED)/models/minilm-l6-sst2 \
	  --train_file $(SHARED)/glue/sst2/train.tsv --validation_file $(SHARED)/glue/sst2/validation.tsv \
	  --n_bits_w 4 --n_bits_a 8 --channel_wise --act_quant --order together --wwq --waq --awq --aaq \
	  --prob 0.5 --input_prob 0.5 --iters_w 200 --num_samples 256 --batch_size 32 --output_dir $(DEMO_OUT) --overwrite_output_dir
