"""Kiln's handle on a Ray cluster: starting or joining Ray and reading its nodes (ray_handle), whether a
worker group fits (placement), and the Ray Jobs client that submits and follows runs (jobs)."""
