"""One trial of a sweep: one ordinary Kiln run (its own TorchTrainer), driven by a Ray Tune trainable.

Ray documents this shape for Tune with Train v2: each Tune trial is a driver that starts a Ray Train run.
The Kiln driver (`ray_train.train`) runs in a thread of the trial's actor; the trainable reports the
run's evaluations to Tune as they land in its metrics.jsonl, so Tune's schedulers see them at once.
The trainable itself (`KilnTrial`) lives in orchestrator/sweep/tune_adapter.py, with Kiln's other Tune classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from data_pipeline.redaction import redact_text
from orchestrator.config import KilnConfig, compose_config
from orchestrator.run.registry import RunRegistry
from orchestrator.sweep.reconcile import RelabelAction, decide_relabel
from orchestrator.sweep.record import trial_run_id
from trainers.run.events import STOP_REQUESTED, read_events
from trainers.run.state import RunState

POLL_S = 0.5
# How long a trial's actor waits, when Tune ends it early, for its run to commit and stop.
STOP_WAIT_S = 300
PRUNED_EVENT = "pruned"
# One result a trial reports to Tune (KilnTrial.step: step, the metric, state, error, done), as Tune hands it
# back to the scheduler and callbacks with its own keys added: values of many types, checked where read.
TrialResult = dict[str, object]


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares."""

    root: str
    sweep_id: str
    fixed: list[str]  # overrides every trial gets
    metric: str
    on_cluster: bool = False  # the sweep's driver runs as a Ray job: trials wait for a cluster that may grow

    def run_id(self, n: int) -> str:
        return trial_run_id(self.sweep_id, n)


def trial_config(ctx: SweepContext, n: int, point: list[str]) -> KilnConfig:
    """A new trial's run config: the sweep's fixed overrides, its point, its run id and W&B group."""
    extra = [f"run.id={ctx.run_id(n)}", f"storage.root={ctx.root}"]
    if ctx.on_cluster:
        extra.append("cluster.address=auto")
    cfg = compose_config(ctx.fixed + point + extra)
    if cfg.tracker.name == "wandb":
        cfg.tracker.group = ctx.sweep_id
    return cfg


def was_pruned(events: list[dict], since: float) -> bool:
    """Whether the newest stop asked of a run since `since` (epoch s) was the sweep's pruning."""
    stops = [e for e in events if e.get("kind") in (PRUNED_EVENT, STOP_REQUESTED) and e.get("time", 0) >= since]
    return bool(stops) and stops[-1]["kind"] == PRUNED_EVENT


def drive_trial(ctx: SweepContext, n: int, point: list[str], console: Console) -> tuple[str, str | None]:
    """Run (or continue) trial n to its end here; returns (its run's state, one line of error or None)."""
    import time

    from orchestrator.launch.ray_train import RunFailed, train
    from orchestrator.run.planning import plan_resume, start_run

    registry = RunRegistry(ctx.root)
    run_id = ctx.run_id(n)
    started = time.time()
    command = f"kiln sweep {ctx.sweep_id} (trial {n})"
    try:
        if run_id in registry.run_ids():
            overrides = ["cluster.address=auto"] if ctx.on_cluster else []
            # Its last driver was an actor of this sweep's driver, which is gone (`kiln sweep resume` checked):
            # no need to wait out the heartbeat of a driver on another node.
            ours = str((registry.load(run_id).driver or {}).get("command", "")).startswith(
                f"kiln sweep {ctx.sweep_id} "
            )
            plan, registry, record = plan_resume(ctx.root, run_id, overrides, force=ours)
        else:
            plan, registry, record = start_run(
                trial_config(ctx, n, point), log=lambda m: console.print(f"[dim]{m}[/dim]")
            )
        outcome = train(plan, console, (registry, record), command)
    except RunFailed as exc:
        return RunState.FAILED, redact_text(str(exc))
    except Exception as exc:  # a trial that cannot run ends FAILED; the others go on
        return RunState.FAILED, redact_text(f"{type(exc).__name__}: {exc}")
    action = decide_relabel(outcome.state, pruned_since_start=None)
    if action == RelabelAction.ASK_EVENTS:
        pruned = was_pruned([e for _, e in read_events(registry.run_url(run_id))], started)
        action = decide_relabel(outcome.state, pruned)
    if action == RelabelAction.RELABEL_PRUNED:
        record = registry.load(run_id)
        record.state = RunState.PRUNED
        registry.save(record)
        return RunState.PRUNED, None
    return outcome.state, None
