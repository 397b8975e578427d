"""Checkpoints: the store that commits and verifies them (store), when to take them (schedule), which to
keep (policy), the verified in-memory restore copy (restore_copy), resharding to another world size
(resharding), parameter shapes (shapes) and weights-only loading (safe_load)."""
