"""One worker's training loop: models, tasks, strategies, checkpoints, trackers. Never imports `ray`."""
