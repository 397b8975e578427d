"""Checkpoints: a step folder's names and manifest, torch-free for the driver (layout), the store that commits
and verifies them (store), when to take them (schedule), which to
keep (policy), the verified in-memory restore copy (restore_copy), resharding to another world size
(resharding), parameter shapes (shapes), weights-only loading (safe_load), DCP's safe readers (dcp_read),
and what this package asks of a strategy (shards). trainers/strategies/ uses this package, never the
other way round."""
