"""Running a run's workers: Ray Train's launcher (ray_train) and its worker adapter (ray_worker), the
torchrun launcher (torchrun), and what the driver watches meanwhile (driver_watch, progress)."""
