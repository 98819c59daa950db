"""terminator-hyperzzw: nothing is compiled at install time.

The C++/CUDA sources in csrc/ ship inside the package as ``terminator/_csrc`` and
are compiled on first use (terminator/ops/_build.py).
"""

from setuptools import find_packages, setup

setup(
    name="terminator-hyperzzw",
    version="0.1.0",
    description="The HyperZ·Z·W operator and the Terminator network (arXiv 2401.17948) as PyTorch ops",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["terminator", "terminator.*"]) + ["terminator._csrc"],
    package_dir={"terminator._csrc": "csrc"},
    package_data={"terminator._csrc": ["*.h", "*.cpp", "*/*.h", "*/*.cuh", "*/*.cpp", "*/*.cu"]},
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        # tools/ci/lint.sh: pinned, so the same code is clean on every machine
        "lint": ["ruff==0.17.5", "clang-format==23.1.3"],
        # terminator train / eval: YAML configs, progress bars, plots, MNIST-1D, digits
        "train": ["pyyaml", "tqdm", "matplotlib", "mnist1d", "scikit-learn"],
    },
    entry_points={"console_scripts": ["terminator=terminator.cli:main"]},
)
