"""Experiments on top of `dit`: scaling sweeps and ablations (see docs/ablations.md)."""
