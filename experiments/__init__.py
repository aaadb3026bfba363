"""Experiments of the source checkout, not part of the installed `modelfold` package.

`demo` (`make demo`), the Fashion-MNIST loader (`fashion_mnist`), the training recipe and
checkpoint cache (`train`) and the CNN benchmark sweep (`sweep`, `make bench`). They need the
`bench` extra (`pip install -e '.[bench]'`; `make install` installs `.[dev]`, which includes it)
and the repository root on `sys.path`: `python -m experiments.demo` from the root, pytest
(`pythonpath` in pyproject.toml) and the Makefile set it.
"""
