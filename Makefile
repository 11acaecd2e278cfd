# Entry points a person types. Each target is thin; the work lives in scripts/ and the crates.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build demo test deps unit interop e2e lint bench bench-nbd bench-nbd-client bench-disk bench-fscore bench-campaign-folder mutants campaign-shards clean

all: build

build:
	$(CARGO) build --release --workspace --all-targets

## make demo: the main job on the embedded default; needs nothing but cargo, no root.
demo:
	bash scripts/demo.sh

## make test: lint, every cargo test, then e2e. It installs nothing: that is `make deps` (and
## .ci/run, which runs make deps, then make test). Under CI (any non-empty CI) a test that
## cannot run here (a tool missing, not root) fails. Elsewhere it is skipped, not passed:
## ALLOW_SKIP=1 lets it skip, it writes its name and reason to SKIP_LOG (a temporary file),
## and the list is printed at the end, whether the run failed or not.
TEST_STEPS ?= lint unit e2e
test:
	+@if [ -n "$$CI" ]; then exec $(MAKE) --no-print-directory $(TEST_STEPS); fi; \
	SKIP_LOG=$$(mktemp "$${TMPDIR:-/tmp}/make-test-skips.XXXXXX"); \
	trap 'rm -f "$$SKIP_LOG"' EXIT; status=0; \
	ALLOW_SKIP=1 SKIP_LOG="$$SKIP_LOG" $(MAKE) --no-print-directory $(TEST_STEPS) || status=$$?; \
	if [ -s "$$SKIP_LOG" ]; then \
	    echo "make test: $$(wc -l <"$$SKIP_LOG") skipped, not run here (make deps installs missing tools; some need root):"; \
	    sed 's/^/  SKIPPED /' "$$SKIP_LOG"; \
	else echo "make test: no test skipped"; fi; \
	exit $$status

## make deps: the system tools the tests and benchmarks run (apt-get, as root), rustfmt, clippy.
deps:
	bash scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Unit, property, protocol, bad-input and interop tests (interop needs qemu-io, nbdinfo, ...),
## and the campaign report rendered in headless Chromium (crashmonkey/tests/report_browser.rs).
unit:
	$(CARGO) build --release --workspace --bins
	$(CARGO) test --release --workspace

## A real kernel end to end: nbd-server -> nbdfuse -> loop -> ext4 / XFS -> crashmonkey check;
## then ext4 on an fscore= export, its crash states taken on the disk under fs-core.
e2e:
	bash scripts/e2e.sh
	bash scripts/e2e-fscore.sh

## Three shards of a race campaign, then of an fs campaign, as three processes at once, each
## compared with one whole run.
campaign-shards:
	KIND=race bash scripts/campaign-shards.sh
	KIND=fs bash scripts/campaign-shards.sh

bench: bench-nbd bench-disk bench-fscore

bench-nbd:
	bash scripts/bench-nbd.sh

bench-nbd-client:
	bash scripts/bench-nbd-client.sh

bench-disk:
	bash scripts/bench-disk.sh

bench-fscore:
	bash scripts/bench-fscore.sh

## What `race --out DIR` and `fs campaign --out DIR` (records, index, bundles) cost a
## campaign, with and without.
bench-campaign-folder:
	bash scripts/bench-campaign-folder.sh
	KIND=fs bash scripts/bench-campaign-folder.sh

## make mutants: mutation testing of the modules that decide correctness (cargo-mutants; hours
## in full: MUTANTS_SHARD=0/10 samples a tenth). Results and method: docs/testing.md.
mutants:
	bash scripts/mutants.sh

clean:
	$(CARGO) clean
