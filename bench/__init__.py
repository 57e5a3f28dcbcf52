"""The benchmarks and tools around the scripts: `make bench-*`, `make project`, `make report`, the GPU check.

Run each as a module from the repository root (`python -m bench.run ...`, as the Makefile does) or as a file
with the project's virtual environment, which installs this package (pyproject.toml). bench/launcher.py is
how every one of them, and the tests, starts a script.
"""
