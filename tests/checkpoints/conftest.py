"""Fixtures: the HF-oracle pair (see tests/oracle.py)."""

from oracle import hf_pair  # noqa: F401
