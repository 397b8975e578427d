"""The contract the driver and the workers both speak: a run folder's layout (folder), its state
(state), its events (events) and its STOP request (stop_request). The orchestrator reads and writes
run folders only through this package (tests/unit/test_import_graph.py)."""
