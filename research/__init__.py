"""Study tools for the embedded default (``docs/embedded-default-study.md``): sweeps, baselines and
diagnostics that explain its numbers. Each runs as ``python -m research.<name>`` from the repo root.

The library (``pipeline``) never imports this package; these tools import the library.
"""
