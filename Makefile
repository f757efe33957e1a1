# vfl: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JOB    ?= jobs/smoke.yaml

.PHONY: install test test-all lint demo smoke-test smoke-test-3 smoke-test-workers soak audit precision-auc bench bench-prep bench-train bench-psi bench-quality bench-serve bench-gpu sample-auc clean

install: $(STAMP)

# Re-install only when the project's dependencies change. torch is pinned in pyproject.toml
# (2.13.0 has a CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check vfl_cli data_prep tests benchmarks
	$(BIN)/mypy vfl_cli data_prep

# The essential suite (CI runs this): everything but the tests marked slow.
test: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP) lint
	$(BIN)/python -m pytest -q

# The README's first command: synthetic data -> prep -> certificates -> two processes over HTTPS -> AUC.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py jobs/demo.yaml

# The same flow on a tiny job, asserting the outcome (both exit 0, AUC >= leader-only + 0.03, two-process == local).
smoke-test: $(STAMP)
	$(BIN)/python scripts/demo.py jobs/smoke.yaml --check

# The same on a three-party job (the follower's columns divided between two followers), asserting the same for every party.
smoke-test-3: $(STAMP)
	$(BIN)/python scripts/demo.py jobs/smoke3.yaml --check

# The two-party smoke flow with two worker processes per party (each `vfl train` starts its own; gloo inside a
# party), asserting the same as smoke-test, the AUC against one process per party to 1e-5.
smoke-test-workers: $(STAMP)
	$(BIN)/python scripts/demo.py jobs/smoke.yaml --check --workers 2

# Not in CI (minutes): two parties through a fault-injecting proxy, a kill -9 mid-run, then a resume;
# prints what the run survived and checks the final AUC against a run without network.
soak: $(STAMP)
	$(BIN)/python scripts/soak.py

# Not in CI (~4 min): the defences sweep on the demo job (the strongest label attack a curious follower has, test AUC each
# defence costs); prepares the demo data first if needed. Writes runs/demo/audit/sweep.{csv,png}.
audit: $(STAMP)
	test -f runs/demo/data/leader/meta.json || $(BIN)/python scripts/demo.py jobs/demo.yaml
	$(BIN)/vfl audit --job jobs/demo.yaml --sweep

bench: bench-prep bench-train bench-psi

# 1M x 1M customer ids, 50% overlap, leader and follower as two `vfl psi` processes over mutual TLS.
bench-psi: $(STAMP)
	$(BIN)/python -m benchmarks.psi

bench-prep: $(STAMP)
	$(BIN)/python -m benchmarks.prep

bench-train: $(STAMP)
	$(BIN)/python -m benchmarks.train

# On a machine with CUDA (not in CI): the same rows with every party on the GPU (the 2-worker row needs 2 GPUs, one per
# worker, NCCL inside a party); prints what bench-train prints.
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.train --device cuda

# Not in CI (~9 min; the first run also writes the 1M-customer stores, ~1 min): `vfl serve` at the reference model
# size, 1,000,000 customers per party, leader and follower as two processes over mutual TLS; a closed-loop client at
# concurrency 1/16/64 x 1/100 ids per request, 20 s each, torch and onnxruntime, beside the in-process floor; p50/p95/
# p99, predictions/s, peak RSS per party and the targets. Work dir runs/bench-serve (reused; --rebuild redoes it).
bench-serve: $(STAMP)
	$(BIN)/python -m benchmarks.serve

# Not in CI: vfl on FATE's own vertically split tables (../shared/data/fate), 5 seeds of a stratified 80/20 split,
# from `vfl init` to `vfl infer` on the held-out rows, against central, leader-only and scikit-learn (docs/quality.md).
bench-quality: $(STAMP)
	$(BIN)/python -m benchmarks.quality

# Not in CI (~1 min): test AUC with train.precision bf16 against fp32 on the demo job and on the real sample;
# fails if they differ by more than 0.002. Prepares both jobs' data first if needed.
precision-auc: $(STAMP)
	test -f runs/demo/data/leader/meta.json || $(BIN)/python scripts/demo.py jobs/demo.yaml
	test -f runs/sample/data/leader/meta.json || $(BIN)/vfl prep criteo $(SAMPLE_PREP) --job jobs/sample.yaml
	$(BIN)/python scripts/precision_auc.py jobs/demo.yaml jobs/sample.yaml

# The real Criteo sample (../shared/data/criteo-sample): trained on train.txt (validation carved from it), tested
# on dev.txt + test.txt (800 rows): split learning, central (pooled), leader-only, and the logistic-regression
# oracle (scikit-learn) on the same rows.
SAMPLE_DIR ?= ../shared/data/criteo-sample
SAMPLE_PREP = --input $(SAMPLE_DIR)/train.txt --test $(SAMPLE_DIR)/dev.txt --test $(SAMPLE_DIR)/test.txt
sample-auc: $(STAMP)
	$(BIN)/vfl prep criteo $(SAMPLE_PREP) --job jobs/sample.yaml
	for role in local central leader-only; do \
		VFL_NO_PROGRESS=1 $(BIN)/vfl train --role $$role --job jobs/sample.yaml --restart | grep "test: AUC" || exit 1; \
	done
	printf "logistic regression (scikit-learn oracle) test: AUC %s\n" \
		"$$($(BIN)/python -m tests.lr_oracle $(SAMPLE_DIR)/train.txt $(SAMPLE_DIR)/dev.txt $(SAMPLE_DIR)/test.txt)"

clean:
	rm -rf runs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
