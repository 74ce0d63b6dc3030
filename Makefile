# btu: build, set up, test. `make test` is what CI runs (.ci/run).
CARGO ?= cargo
PYTHON ?= python3

.PHONY: all build setup test demo schemas bench fmt

all: build

build:
	$(CARGO) build --release

# Everything the test suite needs on a fresh machine (package registries only).
setup:
	@$(CARGO) --version
	@command -v cargo-nextest >/dev/null 2>&1 || echo "cargo-nextest not found: using cargo test"

# The test command README names.
test: setup
	$(CARGO) test --release --no-fail-fast

# The main job on the embedded default (synthetic corpus generated in code).
demo: build
	./target/release/btu demo

schemas: build
	./target/release/btu schemas --out schemas

bench:
	$(CARGO) run --release --example bench_detect

fmt:
	$(CARGO) fmt
