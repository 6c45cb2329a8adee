VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DEB_OUT ?= build/deb
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)
RPM_OUT ?= build/rpm
# The checkout as it stands: tracked files and new ones not ignored.
SOURCES = git ls-files -z --cached --others --exclude-standard | \
	tar --null --no-recursion --ignore-failed-read -T - -cf - 2>/dev/null

.PHONY: setup demo test lint bench clean deb rpm man native

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap
	scripts/bootstrap

# The native sendmail client (C, libc only) into build/native/sendmail; the packages build it
# with their own flags. FRONT_END is the Python front end it hands other calls to.
native:
	$(MAKE) -C native O=$(abspath build/native)

# The main job on the embedded default: a loopback STARTTLS upstream, an SQLite ledger,
# a PHP mail() piped through `sendmail -t -i`, and what arrived.
demo: setup
	$(PY) scripts/demo.py

# Under a private root: the default places are empty tmpfs, and a decoy gate on the default
# socket fails the run if any test reaches it (scripts/private-root).
test: setup
	scripts/private-root --decoy $(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check sendmail_shim tests scripts
	$(VENV)/bin/mypy

bench: setup
	$(PY) scripts/bench.py
	$(PY) scripts/bench_ledger.py
	$(PY) scripts/bench_gate.py build/bench/gate.json

# The Debian 12 package, built from the checkout into $(DEB_OUT)/ and checked by lintian.
deb:
	rm -rf $(DEB_OUT)/src $(DEB_OUT)/sendmail-shim_*
	mkdir -p $(DEB_OUT)/src
	$(SOURCES) | tar -xf - -C $(DEB_OUT)/src
	cp -a packaging/debian $(DEB_OUT)/src/debian
	cd $(DEB_OUT)/src && dpkg-buildpackage --build=binary --no-sign
	lintian --fail-on error $(DEB_OUT)/sendmail-shim_$(VERSION)_$(DEB_ARCH).deb
	@echo "built $(DEB_OUT)/sendmail-shim_$(VERSION)_$(DEB_ARCH).deb"

# The RPM, where rpmbuild exists. Off an RPM-based system BuildRequires cannot be checked.
rpm:
	@command -v rpmbuild >/dev/null || { echo "make rpm: rpmbuild is not installed" >&2; exit 1; }
	rm -rf $(RPM_OUT) && mkdir -p $(RPM_OUT)/SOURCES
	$(SOURCES) | tar -xf - --one-top-level=sendmail-shim-$(VERSION) -C $(RPM_OUT)/SOURCES
	tar -czf $(RPM_OUT)/SOURCES/sendmail-shim-$(VERSION).tar.gz -C $(RPM_OUT)/SOURCES sendmail-shim-$(VERSION)
	rm -rf $(RPM_OUT)/SOURCES/sendmail-shim-$(VERSION)
	rpmbuild -bb --define "_topdir $(abspath $(RPM_OUT))" \
		$$(rpm -q rpm >/dev/null 2>&1 || echo --nodeps) packaging/rpm/sendmail-shim.spec
	@ls $(RPM_OUT)/RPMS/*/*.rpm

# Regenerate the man pages from the code (the test suite fails while they differ).
man: setup
	$(PY) scripts/manpages.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
