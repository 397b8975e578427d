"""Hyperparameter sweeps: Hydra's sweep grammar -> points, trials on Ray Tune, the sweep's record.

A trial is an ordinary Kiln run (`<sweep_id>-<n>`); the sweep never reaches into `trainers/`.
"""
