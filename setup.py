"""Placeholder build: packages only. The C++/CUDA extension build (mgpo_kernels._C) replaces this."""
from setuptools import find_packages, setup

setup(name="mgpo_kernels", version="0.1.0", packages=find_packages(include=["mgpo_kernels", "mgpo_kernels.*"]))
