# setuptools reads cffi_modules only from setup(); everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build.py:loop_ffi", "build.py:nbd_ffi", "build.py:mount_ffi"])
