"""Sweeps: grids of runs on local workers or SLURM, and Optuna studies whose trials are runs."""
