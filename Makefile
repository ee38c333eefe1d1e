# compartment — make demo | make test | make bench | make hostile | make soak | make lint
# Debian's interpreter, not a per-user one: MTAs run compartment as unprivileged users
# (Postfix pipe user=, qmail-local), who must be able to execute the venv's python.
PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup venv demo test lint size bench bench-quick hostile hostile-serve soak soak-serve mta clean

# Debian packages: libcap-dev builds python-prctl; libseccomp2 is what pyseccomp loads;
# gcc/libc6-dev build the static probe agents of the tests.
setup: $(STAMP)

$(STAMP): pyproject.toml bin/compartment
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s libcap-dev libseccomp2 gcc libc6-dev python3-venv python3-dev >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			libcap-dev libseccomp2 gcc libc6-dev python3-venv python3-dev >/dev/null; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# compat: a plain .pth path entry; the default editable finder costs every command ~7 ms.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: setup

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check compartment tests bench examples

size:
	$(PYTHON) tools/tcb_size.py

# Every hostile agent, one line each, then "N contained, M escaped" (exit 1 if any escaped).
hostile: setup
	$(PY) tests/hostile/run_hostile.py

# The same through a resident supervisor (compartment serve) the harness starts.
hostile-serve: setup
	$(PY) tests/hostile/run_hostile.py --serve

# 5000 deliveries in a row, then 4 concurrent callers: no leaked fds, zombies, mounts, uids;
# then the same through compartment serve, which must be left as it was found too.
soak: setup
	$(PY) tests/hostile/hostile_soak.py --deliveries 5000 --callers 4
	$(PY) tests/hostile/hostile_soak.py --deliveries 5000 --callers 4 --serve

soak-serve: setup
	$(PY) tests/hostile/hostile_soak.py --deliveries 5000 --callers 4 --serve

# Only the tests that install and drive a real MTA (Postfix, Exim, OpenSMTPD).
mta: setup
	$(PY) -m pytest -q -m mta tests/integration

# Speed and memory targets as ratios against baselines measured in the same run.
bench: setup
	@command -v bwrap >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; }
	$(PY) bench/bench.py

bench-quick: setup
	$(PY) bench/bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
