# mdgru-keras — every target runs inside .venv, created by `make install`.
# Variables: CONFIG (preset name or YAML file), LANDMARKS (comma-separated AFIDs names, or "all"),
# DATA (a prepared dataset), RUN (a run folder holding coarse/ and fine/), EXPORT and NAME (the SavedModel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLI := $(BIN)/mdgru-localize

CONFIG ?= cpu
LANDMARKS ?= PMJ
DEMO ?= demo
DEMO_TRAIN_SUBJECTS ?= 32
DEMO_TEST_SUBJECTS ?= 6
# Training in the demo is bounded by epochs (a fixed, seeded number of steps: 14 steps of 8 per epoch with the
# 27 training subjects), so every machine trains the same model; a slower one only takes longer.
DEMO_COARSE_EPOCHS ?= 22
# The demo's template scans and landmarks (the AFIDs template by default; tests put a small synthetic one here)
# and extra `mdgru-localize synth` options for its population.
DEMO_T1 ?= $(DEMO)/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz
DEMO_T2 ?= $(DEMO)/tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz
DEMO_FIDUCIALS ?= $(DEMO)/afids.fcsv
DEMO_SYNTH_ARGS ?=
DEMO_FINE_EPOCHS ?= 36
# The demo also runs the model shipped with the package (all 32 AFIDs) on its held-out subjects: yes or no.
DEMO_PRETRAINED ?= yes
DATA ?= $(DEMO)/dataset
RUN ?= runs/$(CONFIG)
RUN_COARSE ?= $(RUN)/coarse
RUN_FINE ?= $(RUN)/fine
EXPORT ?= exports
NAME ?= mdgru
VERSION ?=
TRAIN_ARGS ?=

.PHONY: model-afids evaluate-pretrained bench-pretrained install test lint demo demo-data demo-population train-coarse train-fine train export evaluate-demo \
	bench-layer bench-strided-conv bench-data bench-localize bench-predict bench-reports bench-training bench-accuracy bench-ablation bench-cohort clean-demo

install: $(STAMP)

$(STAMP): setup.py
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Two pytest workers (pytest-xdist), one test file each at a time: many tests wait on subprocesses, tracing or
# I/O with one core busy, so two workers on 2 cores take about half as long (14 min instead of 27 here).
PYTEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 tests

# Debian's headless Chromium and its WebDriver, for the QC-report test in a real browser (tests/test_reports.py;
# skipped without them). Installed with apt-get when missing and we are root on a Debian-like system (CI);
# otherwise, or when apt-get fails (no network), a note, and `make test` goes on.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
.PHONY: browser
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver; } || echo "note: apt-get could not install chromium; the browser test" \
			"of the QC reports will be skipped"; \
	else echo "note: no $(CHROMIUM) / $(CHROMEDRIVER) (install chromium and chromium-driver as root);" \
		"the browser test of the QC reports will be skipped"; fi

# The quick subset: every test but those marked slow (training, SavedModel exports, subprocess pipelines, the
# demo; see pyproject.toml), under 5 min on 2 cores. CI runs `make test`.
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=10 -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

# ---- the demo: AFIDs template -> synthetic population -> train coarse + fine -> export -> evaluate --------
demo-data: $(DEMO)/afids.fcsv
$(DEMO)/afids.fcsv: | $(STAMP)
	$(CLI) demo-data --out $(DEMO)

# Training/validation subjects (seed 1) and held-out test subjects (seed 2: deformations and fields of view
# never seen in training), T1w and T2w mixed; the lateral ventricles' AFIDs labelled on the protocol's planes.
demo-population: $(DEMO)/dataset/dataset.json $(DEMO)/test/manifest.csv
$(DEMO)/train/manifest.csv: $(DEMO_FIDUCIALS)
	$(CLI) synth --image $(DEMO_T1) --image2 $(DEMO_T2) --landmarks $(DEMO_FIDUCIALS) \
		--n $(DEMO_TRAIN_SUBJECTS) --seed 1 --workers 2 --protocol-planes --out $(DEMO)/train $(DEMO_SYNTH_ARGS)
$(DEMO)/test/manifest.csv: $(DEMO_FIDUCIALS)
	$(CLI) synth --image $(DEMO_T1) --image2 $(DEMO_T2) --landmarks $(DEMO_FIDUCIALS) \
		--n $(DEMO_TEST_SUBJECTS) --seed 2 --workers 2 --protocol-planes --out $(DEMO)/test $(DEMO_SYNTH_ARGS)
$(DEMO)/dataset/dataset.json: $(DEMO)/train/manifest.csv
	$(CLI) prepare $(DEMO)/train/manifest.csv --out $(DEMO)/dataset --val-fraction 0.15 --test-fraction 0 --overwrite

train-coarse: $(STAMP)
	$(CLI) train --stage coarse --config $(CONFIG) --landmarks $(LANDMARKS) --data $(DATA) --out $(RUN_COARSE) $(TRAIN_ARGS)

train-fine: $(STAMP)
	$(CLI) train --stage fine --config $(CONFIG) --landmarks $(LANDMARKS) --data $(DATA) --out $(RUN_FINE) $(TRAIN_ARGS)

train: train-coarse train-fine

export: $(STAMP)
	$(CLI) export --coarse $(RUN_COARSE) --fine $(RUN_FINE) --out $(EXPORT) --name $(NAME) \
		$(if $(VERSION),--version $(VERSION),)

evaluate-demo: $(STAMP)
	$(CLI) evaluate --model $(EXPORT)/$(NAME) --manifest $(DEMO)/test/manifest.csv \
		--json $(RUN)/evaluation.json --figures $(RUN)/figures
	$(CLI) predict $(DEMO)/test/images/*.nii --model $(EXPORT)/$(NAME) --format fcsv --out $(RUN)/predictions

# The demo trains afresh into $(DEMO)/run each time (the population above is made once and reused).
demo: demo-population
	rm -rf $(DEMO)/run
	$(MAKE) train-coarse RUN=$(DEMO)/run TRAIN_ARGS="--epochs $(DEMO_COARSE_EPOCHS) $(TRAIN_ARGS)"
	$(MAKE) train-fine RUN=$(DEMO)/run TRAIN_ARGS="--epochs $(DEMO_FINE_EPOCHS) $(TRAIN_ARGS)"
	$(MAKE) export RUN=$(DEMO)/run EXPORT=$(DEMO)/run/export
	$(MAKE) evaluate-demo RUN=$(DEMO)/run EXPORT=$(DEMO)/run/export
ifeq ($(DEMO_PRETRAINED),yes)
	$(MAKE) evaluate-pretrained
endif
	@echo "Demo done: table above, figures in $(DEMO)/run/figures, Slicer files in $(DEMO)/run/predictions"

# The shipped 32-AFIDs model on the demo's held-out subjects: per-landmark errors.
evaluate-pretrained: $(STAMP) $(DEMO)/test/manifest.csv
	$(CLI) evaluate --model "$$($(BIN)/python -c 'from mdgru_keras.pretrained import pretrained_model_dir as d; print(d())')" \
		--manifest $(DEMO)/test/manifest.csv --json $(DEMO)/pretrained-evaluation.json

# The shipped model: trains all 32 AFIDs from scratch on 2 CPU cores (steps fixed; resumable: run it again after
# an interruption) and installs it into mdgru_keras/pretrained/afids32. See docs/MODEL_CARD.md.
AFIDS_WORK ?= runs/model-afids
model-afids: $(STAMP)
	$(BIN)/python -m train.model_afids --work $(AFIDS_WORK) --demo $(DEMO)

clean-demo:
	rm -rf $(DEMO)

# ---- benchmarks: JSON under bench/results/, summaries in docs/ ------------------------------------------
bench-layer: $(STAMP)
	$(BIN)/python -m bench.bench_layer

# The models' strided 3D convolutions, TensorFlow's layers against StridedConv3D / StridedConv3DTranspose (under
# a minute on 2 cores; STRIDED_CONV_ARGS="--cases paper" for the paper preset's 256^3 input convolution).
STRIDED_CONV_ARGS ?=
bench-strided-conv: $(STAMP)
	$(BIN)/python -m bench.bench_strided_conv $(STRIDED_CONV_ARGS)

bench-data: $(STAMP)
	$(BIN)/python -m bench.bench_data

bench-localize: $(STAMP)
	$(BIN)/python -m bench.bench_localize

bench-predict: $(STAMP)
	$(BIN)/python -m bench.bench_predict

# Size and rendering time of a 32-landmark QC page on the demo's 1 mm template (seconds; make demo-data first, else
# a synthetic head of the same grid). Writes bench/results/bench_reports.json.
bench-reports: $(STAMP)
	$(BIN)/python -m bench.bench_reports --demo $(DEMO)

# The shipped model on heads it never saw (unseen, held-out-family, beyond-range and moved-template subjects) next
# to registration, and its speed; writes bench/results/bench_pretrained.json and docs/MODEL_CARD.md's table.
# BENCH_PRETRAINED_ARGS="--ants unseen --ants heldout-family" adds affine + SyN registration (ANTsPy, pip install
# 'mdgru-keras[ants]'; 78-100 s per head on 2 cores) on those heads; kept for later runs (bench/bench_pretrained.py).
BENCH_PRETRAINED_ARGS ?=
bench-pretrained: $(STAMP)
	$(BIN)/python -m bench.bench_pretrained --demo $(DEMO) $(BENCH_PRETRAINED_ARGS)

# Which stage limits the shipped model: each stage's own error (the fine stage centred on the truth, on the truth
# + 6 mm, on the coarse estimate) on bench-pretrained's test heads and on training heads, from model-afids's runs.
.PHONY: bench-stages
bench-stages: $(STAMP)
	$(BIN)/python -m bench.bench_stages --work $(AFIDS_WORK) --demo $(DEMO)

bench-training: $(STAMP)
	$(BIN)/python -m bench.bench_training

# Fine-stage training samples per second per landmark, one landmark per window against every landmark inside it
# (the same run, the same batches); needs a prepared dataset of many landmarks: `make model-afids`'s by default.
SAMPLES_DATA ?= $(AFIDS_WORK)/dataset
.PHONY: bench-landmark-samples
bench-landmark-samples: $(STAMP)
	$(BIN)/python -m bench.bench_landmark_samples --data $(SAMPLES_DATA)

# Scans per minute through the cohort workflow (workflow/Snakefile, --cores 2) against one long-running `predict`
# and a `predict` per scan, and the workflow's start-up cost per job, on synthetic 1 mm heads with the shipped
# model (about 13 min on 2 cores; COHORT_ARGS="--participants 24 --repeats 2", say). Writes
# bench/results/bench_cohort.json and the table in docs/BENCH_COHORT.md.
COHORT_ARGS ?=
bench-cohort: $(STAMP)
	$(BIN)/python -m bench.bench_cohort --demo $(DEMO) $(COHORT_ARGS)

# Accuracy on held-out synthetic subjects next to the registration and U-Net baselines (about 75 min on 2 cores;
# rerunning resumes, `rm -rf runs/bench-accuracy` starts over). Writes bench/results/bench_accuracy.json and its
# section of docs/RESULTS.md.
ACCURACY_ARGS ?=
bench-accuracy: $(STAMP)
	$(BIN)/python -m bench.bench_accuracy --demo $(DEMO) $(ACCURACY_ARGS)

# What lets the fine network learn in minutes: one-hot vs soft labels, DropConnect, MD-GRU vs a plain CNN
# (about 7 min on 2 cores, on the demo population). Writes bench/results/ablation_labels.json.
bench-ablation: $(STAMP) demo-population
	$(BIN)/python -m bench.ablation_labels --data $(DEMO)/dataset
