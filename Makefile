# compartment — make demo | make test | make bench | make hostile | make soak | make lint
#               make install [PREFIX=/usr/local] | make uninstall | make deb | make man
# Debian's interpreter, not a per-user one: MTAs run compartment as unprivileged users
# (Postfix pipe user=, qmail-local), who must be able to execute the venv's python.
PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup venv demo test lint size bench bench-quick hostile hostile-serve soak soak-serve mta \
	clean build-debs install uninstall deb man

# Debian packages: libcap-dev builds python-prctl; libseccomp2 is what pyseccomp loads;
# gcc/libc6-dev build python-prctl and the static probe agents of the tests.
BUILD_DEBS := libcap-dev libseccomp2 gcc libc6-dev python3-venv python3-dev
# `make deb`: Debian's own tooling (debian/ says what the package holds and why).
DEB_DEBS   := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	dpkg-dev fakeroot

setup: $(STAMP)

# Installs the Debian packages named on the command line (only as root, only if missing).
define apt_install
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(1) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(1) >/dev/null; fi
endef

build-debs:
	$(call apt_install,$(BUILD_DEBS))

$(STAMP): pyproject.toml bin/compartment
	$(call apt_install,$(BUILD_DEBS))
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
	$(VENV)/bin/ruff check compartment tests bench examples tools

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
	@# Section 9 (the fronts) compares against Dovecot's LMTP server under Postfix (installed
	@# by `make mta`, which swaps MTAs; without Postfix the section says SKIP).
	@[ -x /usr/lib/dovecot/lmtp ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends dovecot-lmtpd >/dev/null
	$(PY) bench/bench.py

bench-quick: setup
	$(PY) bench/bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info compartment_*.deb compartment_*.buildinfo \
		compartment_*.changes

# --- Installing -----------------------------------------------------------------------------
# A virtual environment of Debian's python3 under $(PREFIX)/lib/compartment, world-readable
# (the MTA's unprivileged users start it), the shell front as $(PREFIX)/bin/compartment with
# that interpreter's path written in, the sample agents under $(PREFIX)/libexec/compartment,
# the man pages, the examples (the recipes are run from there), and $(ETCDIR)/policies for the
# administrator's own policies.  Built in a temporary copy of the tree (nothing is left here) and moved into
# place, so a reinstall never leaves a half-made environment behind.
PREFIX  ?= /usr/local
ETCDIR  ?= /etc/compartment
LIBDIR  := $(PREFIX)/lib/compartment
LIBEXEC := $(PREFIX)/libexec/compartment
MANDIR  := $(PREFIX)/share/man
SOURCES := pyproject.toml README.md bin compartment policies
AGENTS  := examples/agents/*
DOCDIR  := $(PREFIX)/share/doc/compartment
MANPAGES = $(wildcard docs/man/*.[1-8])

install: build-debs
	@set -e; umask 022; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	cp -R $(SOURCES) "$$work/"; find "$$work" -name __pycache__ -prune -exec rm -rf {} +; \
	rm -rf "$(LIBDIR).new"; mkdir -p "$(PREFIX)/lib" "$(PREFIX)/bin"; \
	$(PYTHON) -m venv "$(LIBDIR).new"; \
	"$(LIBDIR).new/bin/python" -m pip install -q --no-cache-dir --upgrade pip; \
	"$(LIBDIR).new/bin/python" -m pip install -q --no-cache-dir "$$work[fronts]"; \
	chmod -R a+rX "$(LIBDIR).new"; \
	rm -rf "$(LIBDIR).old"; if [ -e "$(LIBDIR)" ]; then mv "$(LIBDIR)" "$(LIBDIR).old"; fi; \
	mv "$(LIBDIR).new" "$(LIBDIR)"; rm -rf "$(LIBDIR).old"; \
	sed 's|^python=$$|python=$(LIBDIR)/bin/python|' bin/compartment >"$$work/front"; \
	install -m 755 "$$work/front" "$(PREFIX)/bin/.compartment.new"; \
	mv "$(PREFIX)/bin/.compartment.new" "$(PREFIX)/bin/compartment"
	install -d -m 755 "$(LIBEXEC)"
	install -m 755 $(AGENTS) "$(LIBEXEC)/"
	for page in $(MANPAGES); do \
		section=$${page##*.}; install -d -m 755 "$(MANDIR)/man$$section"; \
		install -m 644 "$$page" "$(MANDIR)/man$$section/"; done
	install -d -m 755 "$(DOCDIR)"
	rm -rf "$(DOCDIR)/examples"; cp -R examples "$(DOCDIR)/examples"
	find "$(DOCDIR)" -name __pycache__ -prune -exec rm -rf {} +; chmod -R a+rX,go-w "$(DOCDIR)"
	install -d -m 755 "$(ETCDIR)" "$(ETCDIR)/policies"
	@if [ "$$(id -u)" = 0 ]; then chown root:root "$(ETCDIR)" "$(ETCDIR)/policies"; fi
	@echo "installed: $(PREFIX)/bin/compartment (python: $(LIBDIR)), $(LIBEXEC), $(ETCDIR)"

# Removes what install made; $(ETCDIR) only if the administrator left nothing in it.
uninstall:
	rm -rf "$(LIBDIR)" "$(LIBDIR).new" "$(LIBDIR).old" "$(LIBEXEC)" "$(DOCDIR)" \
		"$(PREFIX)/bin/compartment"
	for page in $(MANPAGES); do rm -f "$(MANDIR)/man$${page##*.}/$${page##*/}"; done
	-rmdir "$(ETCDIR)/policies" "$(ETCDIR)" 2>/dev/null

# The man pages, generated from the parser and the policy fields (tests/test_manpages.py
# fails when the shipped pages differ from what this writes).
man: setup
	$(PY) tools/manpages.py docs/man

# A Debian package (debian/), built in a temporary copy with Debian's own python3 (PATH: not
# an interpreter of the user's); the .deb lands in DEBDIR.
DEBDIR ?= .
deb:
	$(call apt_install,$(DEB_DEBS))
	@set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	mkdir "$$work/src"; cp -R $(SOURCES) debian docs examples "$$work/src/"; \
	find "$$work/src" -name __pycache__ -prune -exec rm -rf {} +; \
	(cd "$$work/src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		dpkg-buildpackage -b -us -uc >"$$work/build.log" 2>&1) || \
		{ tail -40 "$$work/build.log"; exit 1; }; \
	cp "$$work"/compartment_*.deb "$(DEBDIR)/"; ls "$(DEBDIR)"/compartment_*.deb
