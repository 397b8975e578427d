"""A run, as the driver keeps it: its registry and run.json record (registry, record, record_codec), its
attempts and its driver's liveness, its lifecycle (create, resume, find a checkpoint), the one planning
pass (planning, plan, init_source, resume_policy), a submitted run's view, and its metrics and plots."""
