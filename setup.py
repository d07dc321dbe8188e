# The native module is built by cffi from memkv_nixl/_native/build_native.py (see pyproject.toml).
from setuptools import setup

setup(cffi_modules=["memkv_nixl/_native/build_native.py:ffibuilder"])
