# Fulcrum developer entry points. Every target installs what it needs, so a
# fresh Debian machine (root) goes from clone to result with one command.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get

# Debian packages the tests use: curl as a real client; etcd (3.4) for the cluster tests;
# openssh-server for the Ansible test's hosts (network namespaces reached over SSH).
TEST_DEBS  := curl etcd-server openssh-server
# Debian packages the benchmark runs beside Fulcrum (etcd for the cluster section).
BENCH_DEBS := haproxy nginx wrk etcd-server

.PHONY: demo test test-fast bench fuzz lint venv sysdeps-test sysdeps-bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lbnode demo

sysdeps-test:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing; fi

sysdeps-bench:
	@missing=""; for p in $(BENCH_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing; fi

test: $(STAMP) sysdeps-test
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Skips the 1 GiB streaming tests: for the edit-run loop, not for CI.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP) sysdeps-bench
	$(BIN)/python -m bench $(BENCH_ARGS)

# Property-based fuzzing against h11 and through a real node (docs/fuzzing.md); not in CI.
# FUZZ_SECONDS is shared by the three targets (tests/fuzz/budget.py); the suite runs a
# short derandomized version of the same tests.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/fuzz

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info bench/results/*.tmp
