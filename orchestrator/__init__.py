"""Decides what runs where: config, run registry, Ray Train launch, CLI. Imports `ray` only where it launches."""
