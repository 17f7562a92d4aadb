"""Experiments over runs: sweeps, what-if replays and calibration of dumps, run comparisons."""
