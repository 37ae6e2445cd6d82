"""Inference: permutation tests, TFCE, clusters, thresholds."""

from __future__ import annotations
