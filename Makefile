# Two entry points for people (see README.md): `make run` and `make test`.
# Both work on a fresh machine: they install the system packages and the venv themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Kernel tools the library and its tests drive for real; gcc builds the cffi binding and the
# C reference of the benchmark; jq runs the seed driver's command sequence in bench/; qemu-nbd
# and nbdkit are the NBD servers the handshake and server tests talk to.
HOST_PACKAGES := e2fsprogs xfsprogs btrfs-progs util-linux mount udev gcc libc6-dev linux-libc-dev jq \
                 qemu-utils nbdkit

.PHONY: run test bench host-packages venv clean

host-packages:
	@missing=$$(for p in $(HOST_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing host packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml setup.py build.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: host-packages $(VENV)/.installed

run: venv
	$(PY) -m flexvolume.demo

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) bench/attach_latency.py
	$(PY) bench/driver_latency.py

clean:
	rm -rf $(VENV) build *.egg-info loopctl/_ffi*.so bench/ref_attach
