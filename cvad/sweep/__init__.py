"""Sweeps: a search space over run configs (Optuna), executed by Ray workers, recorded in MLflow."""
