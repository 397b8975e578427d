"""The sweep's driver: Ray Tune runs the trials, this module feeds it points and keeps sweep.json current.

Tune owns concurrency, scheduling and early stopping (ASHA); Kiln owns what a trial is (a run), how it is
numbered (`<sweep_id>-<n>`, the same after a resume) and how it stops (a committed checkpoint first).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING

from rich.console import Console

from data_pipeline import storage
from orchestrator.cluster.placement import fits_on, worker_shape
from orchestrator.config import KilnConfig, UsageError, absolute_url
from orchestrator.run.registry import RunRegistry, UnknownRun
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.reconcile import reconcile_trial_end
from orchestrator.sweep.record import (
    NOT_STARTED,
    DriverWork,
    SweepRecord,
    SweepState,
    TrialEntry,
    best_trial,
    refresh_entry,
)
from orchestrator.sweep.settings import SweepConfig
from orchestrator.sweep.space import ParamValue, SweepSpace
from orchestrator.sweep.trial import PRUNED_EVENT, SweepContext, TrialResult
from trainers.run.state import is_terminal
from trainers.run.stop_request import ask_to_stop

if TYPE_CHECKING:
    from ray import tune

    from orchestrator.sweep.tune_adapter import PruningASHA, TrialSource

# A trial's actor only drives its run (Ray Train's controller takes no CPU either): it reserves the memory
# a Kiln driver uses, not a CPU that the run's workers need. (Tune needs some resource in the request.)
TRIAL_DRIVER = {"CPU": 0, "memory": 512 * 2**20}
HEARTBEAT_S = 5  # as a run's driver rewrites run.json (orchestrator/run/liveness.py reads both)


def fitting_trials(nodes: list[dict[str, float]], cfg: KilnConfig) -> int:
    """How many trials' worker groups the cluster's resources hold at once (at least 1), counted as Ray counts."""
    cluster = cfg.cluster
    shape = worker_shape(cluster.cpus_per_worker, cluster.use_gpu, cluster.resources_per_worker)
    group = {name: amount * cluster.min_workers for name, amount in shape.items()}
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + amount
    return max(1, fits_on(group, totals))


def start_line(sweep_id: str, total: int, concurrent: int, settings: SweepConfig, url: str) -> str:
    """What a driver says as it starts: how many trials, how many at a time, how they are searched, where."""
    return (
        f"sweep [bold]{sweep_id}[/bold]: {total} trial(s) to run, "
        f"{concurrent} at a time ({settings.search}"
        + (", ASHA early stopping" if settings.early_stop == "asha" else "")
        + f") -> {url}"
    )


def quiet_tune() -> None:
    """Ray Tune's settings for a Kiln sweep: Kiln's own lines and signal handler instead of Tune's."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a trial that failed early has none
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stops trials with a checkpoint first
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # verbose=0 silences only the classic tables; ours say it
    # A trial's actor death is told in one line, naming Ray's error file (on_trial_recover / on_trial_error),
    # not as Ray's traceback from inside the Tune controller.
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"


class SweepDriver:
    """Runs a sweep's remaining trials on Ray Tune and keeps its sweep.json current (its only writer)."""

    def __init__(self, record: SweepRecord, space: SweepSpace, base: KilnConfig, console: Console):
        self.record, self.space, self.base, self.console = record, space, base, console
        self.root = record.storage_root
        self.registry = RunRegistry(self.root)
        self.ctx = SweepContext(
            self.root,
            record.sweep_id,
            list(record.fixed),
            space.settings.metric,
            on_cluster=base.cluster.address is not None,
        )
        # The heartbeat thread writes the record while Tune's callbacks change it: both hold this lock.
        self.lock = threading.RLock()
        self.signalled: str | None = None

    def __getstate__(self) -> dict:
        # Tune pickles its searcher, scheduler and callbacks (for a Tuner.restore Kiln does not use); they
        # hold this driver, whose lock and console do not pickle.
        state = self.__dict__.copy()
        state.pop("lock")
        state.pop("console")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock, self.console = threading.RLock(), Console()

    def entry(self, n: int, point: list[str] | None = None, params: dict | None = None) -> TrialEntry:
        """Trial n's entry, added if the sweep has none yet."""
        with self.lock:
            found = self.record.trial(n)
            if found is None:
                found = TrialEntry(n, self.ctx.run_id(n), list(point or []), params=dict(params or {}))
                self.record.trials = sorted([*self.record.trials, found], key=lambda t: t.n)
                if point is not None and point not in self.record.points:
                    self.record.points.append(list(point))
            return found

    def save(self) -> None:
        with self.lock:
            sweeps.save(self.root, self.record)

    def refresh(self, entry: TrialEntry) -> None:
        with self.lock:
            refresh_entry(self.registry, entry, self.space.settings.metric)

    def run(self, work: DriverWork) -> str:
        """Run the work's queued trials, then its new Optuna ones; returns the sweep's end state."""
        from orchestrator.cluster.ray_handle import cluster_nodes

        settings = self.space.settings
        total = len(work.queue) + work.new_trials
        concurrent = settings.max_concurrent or fitting_trials(cluster_nodes(), self.base)
        self.record.max_concurrent = concurrent = min(concurrent, max(total, 1))
        self.record.state, self.record.error = SweepState.RUNNING, None
        self.save()
        url = sweeps.sweep_url(self.root, self.record.sweep_id)
        self.console.print(start_line(self.record.sweep_id, total, concurrent, settings, url))
        if total:
            source = self.trial_source(work)
            scheduler = self.asha()
            quiet_tune()
            tuner = self.tuner(source, scheduler, total)
            with self.signals(), self.heartbeat():
                tuner.fit()
        return self.finish()

    def trial_source(self, work: DriverWork) -> TrialSource:
        """Tune's searcher: the queued trials, then new Optuna ones numbered after the sweep's last trial."""
        from orchestrator.sweep.tune_adapter import TrialSource

        return TrialSource(
            work.queue,
            self.space,
            work.new_trials,
            max((t.n for t in self.record.trials), default=0) + 1,
            work.evaluated,
            on_new=self.on_new_trial,
            stopped=lambda: sweeps.sweep_stop_requested(self.root, self.record.sweep_id),
        )

    def asha(self) -> PruningASHA | None:
        """With sweep.early_stop=asha, ASHA over the trials' training steps, pruning through `prune`; else None."""
        from orchestrator.sweep.tune_adapter import PruningASHA

        settings = self.space.settings
        if settings.early_stop != "asha":
            return None
        train = self.base.train
        return PruningASHA(
            settings,
            max_t=train.max_steps,
            grace=settings.grace_period or train.eval_every,
            on_prune=self.prune,
        )

    def tuner(self, source: TrialSource, scheduler: PruningASHA | None, total: int) -> tune.Tuner:
        """Ray Tune's Tuner of the sweep's trials: each a KilnTrial actor, recorded in sweep.json as it goes."""
        from ray import tune

        from orchestrator.sweep.tune_adapter import KilnTrial, SweepRecorder

        return tune.Tuner(
            tune.with_resources(tune.with_parameters(KilnTrial, context=self.ctx), TRIAL_DRIVER),
            tune_config=tune.TuneConfig(
                search_alg=source,
                scheduler=scheduler,
                num_samples=total,
                max_concurrent_trials=self.record.max_concurrent,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=tune_storage(self.root, self.record.sweep_id, self.base),
                verbose=0,
                callbacks=[SweepRecorder(self)],
                # Only a trial's actor dying errs a trial (KilnTrial returns its run's failure as a result).
                failure_config=tune.FailureConfig(max_failures=self.space.settings.trial_restarts),
                # A trial's checkpoints are its run's own (committed by Kiln); Tune keeps none.
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
            ),
        )

    def heartbeat(self):
        """Rewrite sweep.json every few seconds while trials run: from another host, that is how a live driver looks."""
        from contextlib import contextmanager

        @contextmanager
        def beating():
            done = threading.Event()

            def beat() -> None:
                while not done.wait(HEARTBEAT_S):
                    self.save()

            thread = threading.Thread(target=beat, name="kiln-sweep-heartbeat", daemon=True)
            thread.start()
            try:
                yield
            finally:
                done.set()
                thread.join()

        return beating()

    def on_new_trial(self, n: int, point: list[str], params: dict[str, ParamValue]) -> None:
        self.entry(n, point, params)
        self.save()

    def prune(self, n: int, result: TrialResult) -> None:
        """ASHA's STOP: the run commits a checkpoint and stops; its trial then ends PRUNED."""
        metric = self.space.settings.metric
        value = result.get(metric)
        reason = (
            f"pruned by the sweep's ASHA scheduler at step {result.get('step')}: {metric}="
            f"{value:.4g} is not among the best of its rung"
            if isinstance(value, (int, float))
            else "pruned by the sweep's ASHA scheduler"
        )
        url = self.registry.run_url(self.ctx.run_id(n))
        ask_to_stop(url, reason, event=PRUNED_EVENT, step=result.get("step"))
        self.console.print(f"trial {n} ({' '.join(self.entry(n).overrides)}): {reason}")

    def trial_ended(self, n: int, result: dict) -> None:
        """Trial n's entry as its run and Tune's last result say it ended, saved and (mostly) announced."""
        with self.lock:
            entry = self.entry(n)
            self.refresh(entry)  # the run's own record says how it ended
            end = reconcile_trial_end(
                entry.state,
                entry.error,
                result.get("state"),
                result.get("error"),
                run_exists(self.registry, entry.run_id),
            )
            entry.state, entry.error = end.state, end.error
            self.save()
        if not end.announce:
            return
        metric = self.space.settings.metric
        shown = f", {metric} {entry.last_metric:.4f}" if entry.last_metric is not None else ""
        error = f": {result['error']}" if result.get("error") else ""
        self.console.print(f"trial {n} {entry.state} at step {entry.step}{shown}{error}")

    def finish(self) -> str:
        """Every entry refreshed, the best marked, the sweep's end state saved."""
        with self.lock:
            for entry in self.record.trials:
                self.refresh(entry)
            best = best_trial(self.record.trials, self.space.settings.mode)
            self.record.best = best.run_id if best else None
            optuna = self.record.search == "optuna"
            expected = (self.space.settings.num_trials or 0) if optuna else len(self.record.points)
            states = [t.state for t in self.record.trials] + [NOT_STARTED] * max(0, expected - len(self.record.trials))
            self.record.state = sweeps.ended_state(states)
            self.save()
            return self.record.state

    def signals(self):
        """SIGTERM or a first Ctrl-C stops the sweep gracefully; a second Ctrl-C aborts."""
        from contextlib import contextmanager

        @contextmanager
        def handled():
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def handle(signum, frame) -> None:
                if self.signalled and signum == signal.SIGINT:
                    raise KeyboardInterrupt
                self.signalled = f"the sweep's driver received {signal.Signals(signum).name}"
                self.console.print(
                    f"[yellow]{signal.Signals(signum).name}: stopping every trial with a committed checkpoint "
                    "(Ctrl-C again aborts)[/yellow]"
                )
                stop_sweep(self.root, self.record, self.signalled)

            previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

        return handled()


def stop_sweep(root: str, record: SweepRecord, reason: str) -> list[str]:
    """Leave the sweep's STOP marker and ask each running trial's run to commit and stop; the runs asked."""
    sweeps.request_sweep_stop(root, record.sweep_id, reason)
    registry = RunRegistry(root)
    asked = []
    for entry in record.trials:
        try:
            run = registry.load(entry.run_id)
        except UnknownRun:
            continue
        if not is_terminal(run.state):
            url = registry.run_url(entry.run_id)
            ask_to_stop(url, reason)
            asked.append(entry.run_id)
    return asked


def run_exists(registry: RunRegistry, run_id: str) -> bool:
    """Whether the run has a record."""
    try:
        registry.load(run_id)
    except UnknownRun:
        return False
    return True


def tune_storage(root: str, sweep_id: str, base: KilnConfig) -> str:
    """Where Ray Tune keeps its own experiment files: beside sweep.json for a local root, else the local cache."""
    if storage.is_local(root):
        return sweeps.sweep_url(root, sweep_id)
    if base.data.cache_dir is None:
        raise UsageError("data.cache_dir is unset: the config was not finalized")
    return os.path.join(absolute_url(base.data.cache_dir), "tune", sweep_id)
