# Two entry points for people (see README.md): `make run` and `make test`.
# Both work on a fresh machine: they install the system packages and the venv themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Kernel tools the library and its tests drive for real; gcc builds the cffi binding and the
# C reference of the benchmark; jq runs the seed driver's command sequence in bench/; qemu-nbd,
# qemu-storage-daemon (qemu-system-common: what nbd.server runs for image files) and nbdkit are
# the NBD servers the handshake and server tests talk to; debootstrap makes the
# Python-less node the deployment tests install the image's tree into, and patchelf builds that
# tree (deploy/bundle.py).
HOST_PACKAGES := e2fsprogs xfsprogs btrfs-progs util-linux mount udev gcc libc6-dev linux-libc-dev \
                 jq qemu-utils qemu-system-common nbdkit debootstrap patchelf

.PHONY: run test test-vm bench bench-nfs host-packages venv clean

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

# The real-kernel lane (tests/vm: Debian's kernel under QEMU, for NBD, NFS and anything else
# the host kernel lacks), then the host suite; both always run, and either failing (pytest's
# "no tests collected" included) fails.
test: venv
	$(PY) tests/vm/run.py; vm=$$?; echo "VM lane: exit $$vm"; \
	  $(PY) -m pytest -m "not vm"; host=$$?; exit $$(( host || vm ))

# The real-kernel lane alone; VM_ARGS go to the VM's pytest, e.g. make test-vm VM_ARGS='-k nbd'
test-vm: venv
	$(PY) tests/vm/run.py $(VM_ARGS)

bench: venv
	$(PY) bench/attach_latency.py
	$(PY) bench/driver_latency.py
	$(PY) bench/ploop_format.py

# Small files on plain NFS against a flexblock volume on that NFS, in the VM lane (a few minutes
# under TCG): the table on stdout, bench/nfs_small_files.png and .json. BENCH_NFS_ARGS go to
# the benchmark, e.g. make bench-nfs BENCH_NFS_ARGS='--files 10000 --delay-us 500'.
bench-nfs: venv $(VENV)/.bench-installed
	$(PY) tests/vm/run.py --output bench --script bench/nfs_small_files.py -- $(BENCH_NFS_ARGS)

# The bench extra (matplotlib, for the plot).
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info loopctl/_ffi*.so bench/ref_attach
