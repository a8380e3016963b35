"""Packaging: the `surgery` package, `kernels/` installed as `surgery.kernels`, and the `surgery._C` extension."""
from setuptools import setup

setup(
    packages=["surgery", "surgery.models", "surgery.data", "surgery.ops", "surgery.bench", "surgery.kernels"],
    package_dir={"surgery.kernels": "kernels"},
)
