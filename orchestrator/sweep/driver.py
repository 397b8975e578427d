"""The sweep's driver: Ray Tune runs the trials, this module feeds it points and keeps sweep.json current.

Tune owns concurrency, scheduling and early stopping (ASHA); Kiln owns what a trial is (a run), how it is
numbered (`<sweep_id>-<n>`, the same after a resume) and how it stops (a committed checkpoint first).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console

from data_pipeline import storage
from orchestrator.config import KilnConfig, UsageError, absolute_url
from orchestrator.placement import fits_on, worker_shape
from orchestrator.registry import RunRegistry, UnknownRun
from orchestrator.sweep import record as sweeps
from orchestrator.sweep.reconcile import AshaStep, decide_asha, reconcile_trial_end
from orchestrator.sweep.record import NOT_STARTED, SweepRecord, SweepState, TrialEntry, best_trial, refresh_entry
from orchestrator.sweep.space import SweepSpace
from orchestrator.sweep.trial import PRUNED_EVENT, SweepContext, trainable_class
from trainers.preemption import ask_to_stop
from trainers.run_state import RunState, is_terminal

# A trial's actor only drives its run (Ray Train's controller takes no CPU either): it reserves the memory
# a Kiln driver uses, not a CPU that the run's workers need. (Tune needs some resource in the request.)
TRIAL_DRIVER = {"CPU": 0, "memory": 512 * 2**20}
HEARTBEAT_S = 5  # as a run's driver rewrites run.json (orchestrator/liveness.py reads both)


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


def asha_scheduler(settings: Any, metric: str, mode: str, max_t: int, grace: int, on_prune: Callable):
    """Ray Tune's ASHA, over training steps, that prunes a trial by asking its run to commit and stop.

    Tune would end a stopped trial's actor within seconds; a Kiln run must first commit its checkpoint. So
    a STOP decision becomes a stop request to the run (as `kiln stop` makes), and the trial ends itself.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class PruningASHA(AsyncHyperBandScheduler):
        def __init__(self) -> None:
            super().__init__(
                time_attr="step",
                metric=metric,
                mode=mode,
                max_t=max_t,
                grace_period=grace,
                reduction_factor=settings.reduction_factor or 2,
                stop_last_trials=False,
            )
            self.pruned: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            step = decide_asha(decision == TrialScheduler.STOP, bool(result.get("done")), trial.trial_id in self.pruned)
            if step == AshaStep.PASS_ON:
                return decision
            if step == AshaStep.PRUNE:
                self.pruned.add(trial.trial_id)
                on_prune(trial.config["trial"], result)
            return TrialScheduler.CONTINUE

    return PruningASHA()


def trial_source(
    queue: list[tuple[int, list[str]]],
    space: SweepSpace,
    new_trials: int,
    next_n: int,
    evaluated: list[tuple[dict, float]],
    on_new: Callable[[int, list[str], dict], None],
    stopped: Callable[[], bool],
):
    """A Tune searcher: the queued (numbered) points first, then `new_trials` fresh Optuna suggestions.

    Numbering lives here, not in Tune's trial ids, so that trial n is run `<sweep_id>-<n>` in every driver
    that ever runs the sweep. Optuna starts from the trials that already finished (`evaluated`).
    """
    from ray.tune.search import Searcher

    settings = space.settings

    class TrialSource(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=settings.metric, mode=settings.mode)
            self.queue, self.left, self.next_n = list(queue), new_trials, next_n
            self.optuna = None
            if new_trials:
                import optuna
                from ray.tune.search.optuna import OptunaSearch

                optuna.logging.set_verbosity(optuna.logging.WARNING)  # its study banner; trials say what happens

                self.optuna = OptunaSearch(
                    space.optuna_space(),
                    metric=settings.metric,
                    mode=settings.mode,
                    seed=settings.seed or 0,
                    points_to_evaluate=[params for params, _ in evaluated] or None,
                    evaluated_rewards=[value for _, value in evaluated] or None,
                )
            self.from_optuna: set[str] = set()

        def suggest(self, trial_id: str) -> dict | None:
            if stopped():
                return Searcher.FINISHED
            if self.queue:
                n, point = self.queue.pop(0)
                return {"trial": n, "point": point}
            if self.optuna is None or self.left <= 0:
                return Searcher.FINISHED
            params = self.optuna.suggest(trial_id)
            if not isinstance(params, dict):
                return params
            n, point = self.next_n, space.point_from(params)
            self.next_n, self.left = self.next_n + 1, self.left - 1
            self.from_optuna.add(trial_id)
            on_new(n, point, params)
            return {"trial": n, "point": point}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if self.optuna is not None and trial_id in self.from_optuna:
                scored = result is not None and isinstance(result.get(settings.metric), (int, float))
                self.optuna.on_trial_complete(trial_id, result if scored else None, error=error or not scored)

    return TrialSource()


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

    def run(self, queue: list[tuple[int, list[str]]], new_trials: int, evaluated: list[tuple[dict, float]]) -> str:
        """Run the queued trials and `new_trials` Optuna ones; returns the sweep's end state."""
        from ray import tune

        from orchestrator.launcher import cluster_nodes

        settings = self.space.settings
        total = len(queue) + new_trials
        concurrent = settings.max_concurrent or fitting_trials(cluster_nodes(), self.base)
        self.record.max_concurrent = min(concurrent, max(total, 1))
        self.record.state, self.record.error = SweepState.RUNNING, None
        self.save()
        self.console.print(
            f"sweep [bold]{self.record.sweep_id}[/bold]: {total} trial(s) to run, "
            f"{self.record.max_concurrent} at a time ({settings.search}"
            + (", ASHA early stopping" if settings.early_stop == "asha" else "")
            + f") -> {sweeps.sweep_url(self.root, self.record.sweep_id)}"
        )
        if total:
            source = trial_source(
                queue,
                self.space,
                new_trials,
                max((t.n for t in self.record.trials), default=0) + 1,
                evaluated,
                on_new=self.on_new_trial,
                stopped=lambda: sweeps.sweep_stop_requested(self.root, self.record.sweep_id),
            )
            scheduler = None
            if settings.early_stop == "asha":
                train = self.base.train
                scheduler = asha_scheduler(
                    settings,
                    settings.metric,
                    settings.mode,
                    max_t=train.max_steps,
                    grace=settings.grace_period or train.eval_every,
                    on_prune=self.prune,
                )
            os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a trial that failed early has none
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stops trials with a checkpoint first
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # verbose=0 silences only the classic tables; ours say it
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(trainable_class(), context=self.ctx), TRIAL_DRIVER),
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
                    callbacks=[self.recorder()],
                    failure_config=tune.FailureConfig(max_failures=0),
                    # A trial's checkpoints are its run's own (committed by Kiln); Tune keeps none.
                    checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
                ),
            )
            with self.signals(), self.heartbeat():
                tuner.fit()
        return self.finish()

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

    def on_new_trial(self, n: int, point: list[str], params: dict) -> None:
        self.entry(n, point, params)
        self.save()

    def prune(self, n: int, result: dict) -> None:
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

    def recorder(self):
        """A Tune callback that keeps each trial's entry current and says what happens to it."""
        from ray.tune import Callback

        driver = self

        class SweepRecorder(Callback):
            def on_trial_start(self, iteration, trials, trial, **info) -> None:
                with driver.lock:
                    entry = driver.entry(trial.config["trial"], trial.config["point"])
                    entry.state = RunState.RUNNING
                    driver.save()
                driver.console.print(f"trial {entry.n} started: {entry.run_id} {' '.join(entry.overrides)}")

            def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
                entry = driver.entry(trial.config["trial"])
                driver.refresh(entry)
                driver.save()

            def on_trial_complete(self, iteration, trials, trial, **info) -> None:
                driver.trial_ended(trial.config["trial"], trial.last_result or {})

            def on_trial_error(self, iteration, trials, trial, **info) -> None:
                driver.trial_ended(trial.config["trial"], {"state": RunState.FAILED, "error": str(trial.error_file)})

        return SweepRecorder()

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
