# The README's two commands are `make run` and `make test`; `make bench` is separate.
# Debian's own interpreter when there is one: what a Debian list server runs, and it ran
# the same Twisted server 9-19% faster than the pyenv build first on PATH here.
PY        ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || echo python3)
VENV      ?= .venv
STATE     ?= $(CURDIR)/state
BUILD     ?= $(CURDIR)/build
MAILMAN_VENV ?= $(BUILD)/mailman-venv
# The reference Mailman runs on an interpreter named here, never whichever python3 is first
# on PATH: Debian's own /usr/bin/python3 (what Debian's Mailman packages use).  Mailman
# reads senders with the stdlib's email.utils.getaddresses, which parses strictly on every
# current Python (the CVE-2023-27043 fix: Debian 12's 3.11.2, 3.11.10+, 3.12.6+, 3.13).
MAILMAN_PY ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
PIP        = $(VENV)/bin/python -m pip -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: run test bench bench-ab bench-floor bench-readme venv mailman-venv mta-deps packaging-deps test-deps deb sdist clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# compat mode puts the checkout on sys.path, so Twisted finds twisted/plugins/ (twist policyd)
	$(PIP) install -e '.[test,postgresql,mysql]' --config-settings editable_mode=compat
	touch $@

# The real Mailman 3 core, the reference for its semantics, in a virtualenv of its own,
# rebuilt when MAILMAN_PY names another interpreter than the one it was made with.
mailman-venv:
	@want="$$(readlink -f "$$(command -v $(MAILMAN_PY))")"; \
	if [ -z "$$want" ]; then echo "mailman-venv: MAILMAN_PY=$(MAILMAN_PY) not found" >&2; exit 1; fi; \
	if [ ! -f $(MAILMAN_VENV)/.installed ] || [ "$$(cat $(MAILMAN_VENV)/.python 2>/dev/null)" != "$$want" ]; then \
	  rm -rf $(MAILMAN_VENV) && \
	  $(MAILMAN_PY) -m venv $(MAILMAN_VENV) && \
	  $(MAILMAN_VENV)/bin/python -m pip -q --disable-pip-version-check install 'mailman==3.3.10' psycopg2-binary && \
	  echo "$$want" > $(MAILMAN_VENV)/.python && touch $(MAILMAN_VENV)/.installed; \
	fi
	@$(MAILMAN_VENV)/bin/python -c 'import email.utils as u, sys; \
	strict = u.getaddresses(["<a@example.com>garbage"]) == [("", "")]; \
	print("reference Mailman: $(MAILMAN_PY) (Python %s); getaddresses parses %s" \
	      % (sys.version.split()[0], "strictly" if strict else "leniently (no CVE-2023-27043 fix: the agreement suites expect a strict parser)"))'

# Debian's Postfix and Exim for the real-MTA tests (needs root; the tests skip outside CI
# and fail in CI when the MTAs are missing).
mta-deps:
	@if [ "$$(id -u)" = 0 ]; then bash tests/integration/mta/install-mtas.sh "$(BUILD)/mta"; \
	else echo "mta-deps: not root, not installing Exim and Postfix (their tests will skip outside CI)"; fi

# What the package test (tests/packaging/) needs on this machine: debootstrap for the
# Debian 13 chroots (the package is built and installed inside them, with trixie's
# debhelper, dh-python, pybuild-plugin-pyproject and lintian), man for `man -l`, and
# publicsuffix (what `policyd --check-config` and dmarc-mitigation read by default).
packaging-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  need=""; for p in debootstrap man-db groff-base publicsuffix; do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || need="$$need $$p"; done; \
	  if [ -n "$$need" ]; then apt-get -q update && DEBIAN_FRONTEND=noninteractive apt-get -q -y install $$need; fi; \
	else echo "packaging-deps: not root, not installing debootstrap (the package test will skip outside CI)"; fi

test-deps: venv mailman-venv mta-deps packaging-deps

test: test-deps
	POLICYD_MAILMAN_PYTHON=$(MAILMAN_VENV)/bin/python POLICYD_MTA_DIR=$(BUILD)/mta \
	  $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

run: venv
	$(VENV)/bin/python -m policyd.demo --state-dir $(STATE)
	exec $(VENV)/bin/policyd --config $(STATE)/policyd.conf

# Every performance target (issue 14; bench/runner.py says what runs): one PASS/FAIL
# table, the load average before each suite, and the exit status of the verdict: 0 when
# every target is met, 1 when one is missed, 2 when the harness itself failed.  The
# Mailman 3 database suite runs inside it.  BENCH_ARGS: e.g. --quick (checks the harness
# on small stores in a few minutes), --timeline, --skip-postgresql.
BENCH_ARGS ?=
bench: venv mailman-venv
	$(VENV)/bin/python -m bench --state-dir $(BUILD)/bench \
	  --mailman-python $(MAILMAN_VENV)/bin/python $(BENCH_ARGS)

# This tree against an earlier revision, in one harness and alternating (bench/ab.py):
# closed-loop q/s and CPU per request, Postfix and Exim; 1 when this tree takes more than
# 5 % more CPU per request.  make bench-ab BEFORE=8cd0501
BEFORE ?= HEAD
bench-ab: venv
	$(VENV)/bin/python -m bench.ab --state-dir $(BUILD)/bench --before $(BEFORE)

# Where a Postfix request's CPU goes (bench/floor.py): policyd with parts of its request
# path cut away (no decision line, parse only, I/O only) beside the bare Twisted servers.
bench-floor: venv
	$(VENV)/bin/python -m bench.floor --state-dir $(BUILD)/bench

# The docs' bench results rewritten from runs' results.json (bench/readme.py).
RUNS ?=
bench-readme: venv
	$(VENV)/bin/python -m bench.readme $(RUNS)

# The sdist (build/sdist), and the Debian 13 (trixie) package built from it in a trixie
# chroot with Debian's own Python packages, lintian included (build/deb; needs root and
# debootstrap: make packaging-deps).  The chroots are cached in POLICYD_TRIXIE_CACHE or
# build/trixie; tests/packaging/ builds the package the same way and installs it.
TRIXIE_CACHE ?= $(or $(POLICYD_TRIXIE_CACHE),$(BUILD)/trixie)
sdist: venv
	rm -rf $(BUILD)/sdist
	$(VENV)/bin/python -c 'import sys; from setuptools import build_meta as b; \
	  print(b.build_sdist(sys.argv[1]))' $(BUILD)/sdist

deb: sdist packaging-deps
	bash tests/packaging/trixie.sh deb $(TRIXIE_CACHE) "$$(ls $(BUILD)/sdist/policyd-*.tar.gz)" $(BUILD)/deb
	@ls $(BUILD)/deb/policyd_*_all.deb

clean:
	rm -rf $(VENV) $(BUILD) $(STATE) *.egg-info .pytest_cache .hypothesis
