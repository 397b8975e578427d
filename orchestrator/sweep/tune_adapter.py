"""Kiln's side of Ray Tune: the trial trainable, the trial source, ASHA that prunes with a checkpoint, the recorder.

This module imports Ray Tune at its top and is itself imported only inside functions (as
orchestrator/launch/ray_worker.py is for Ray Train), so `kiln status`, `kiln sweep status` and the sweep's pure
decisions (orchestrator/sweep/reconcile.py) never import Tune. The classes decide nothing themselves:
they hand Tune's calls to the sweep's driver and to the decisions in reconcile.py.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypedDict

from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import Searcher
from rich.console import Console

from data_pipeline import storage
from orchestrator.launch.progress import MetricsTail
from orchestrator.run.registry import METRICS_FILE, RunRegistry
from orchestrator.sweep.reconcile import AshaStep, decide_asha
from orchestrator.sweep.record import NOT_STARTED, TrialEntry, sweep_stop_requested
from orchestrator.sweep.settings import SweepConfig
from orchestrator.sweep.space import ParamValue, SweepSpace
from orchestrator.sweep.trial import POLL_S, STOP_WAIT_S, SweepContext, TrialResult, drive_trial
from trainers.failpoints import failpoint
from trainers.run.state import RunState
from trainers.run.stop_request import ask_to_stop

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial
    from ray.tune.search.optuna import OptunaSearch


class TrialSpec(TypedDict):
    """A trial's config in Tune (what TrialSource suggests, what KilnTrial.setup gets): its number and its point."""

    trial: int
    point: list[str]


class TrialLedger(Protocol):
    """What the recorder needs of the sweep's driver (orchestrator/sweep/driver.py's SweepDriver)."""

    lock: threading.RLock
    console: Console

    def entry(self, n: int, point: list[str] | None = None) -> TrialEntry: ...
    def save(self) -> None: ...
    def refresh(self, entry: TrialEntry) -> None: ...
    def trial_ended(self, n: int, result: dict) -> None: ...


class PruningASHA(AsyncHyperBandScheduler):
    """Ray Tune's ASHA, over training steps, that prunes a trial by asking its run to commit and stop.

    Tune would end a stopped trial's actor within seconds; a Kiln run must first commit its checkpoint. So
    a STOP decision becomes a stop request to the run (as `kiln stop` makes), and the trial ends itself.
    """

    def __init__(
        self, settings: SweepConfig, max_t: int, grace: int, on_prune: Callable[[int, TrialResult], None]
    ) -> None:
        super().__init__(
            time_attr="step",
            metric=settings.metric,
            mode=settings.mode,
            max_t=max_t,
            grace_period=grace,
            reduction_factor=settings.reduction_factor or 2,
            stop_last_trials=False,
        )
        self.on_prune = on_prune
        self.pruned: set[str] = set()

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: TrialResult) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        step = decide_asha(decision == TrialScheduler.STOP, bool(result.get("done")), trial.trial_id in self.pruned)
        if step == AshaStep.PRUNE:
            self.pruned.add(trial.trial_id)
            self.on_prune(trial.config["trial"], result)
        failpoint("sweep.asha_decided", trial=trial.config["trial"], step=result.get("step"))
        return decision if step == AshaStep.PASS_ON else TrialScheduler.CONTINUE


class TrialSource(Searcher):
    """A Tune searcher: the queued (numbered) points first, then `new_trials` fresh Optuna suggestions.

    Numbering lives here, not in Tune's trial ids, so that trial n is run `<sweep_id>-<n>` in every driver
    that ever runs the sweep. Optuna starts from the trials that already finished (`evaluated`).
    """

    def __init__(
        self,
        queue: list[tuple[int, list[str]]],
        space: SweepSpace,
        new_trials: int,
        next_n: int,
        evaluated: list[tuple[dict[str, ParamValue], float]],
        on_new: Callable[[int, list[str], dict[str, ParamValue]], None],
        stopped: Callable[[], bool],
    ) -> None:
        settings = space.settings
        super().__init__(metric=settings.metric, mode=settings.mode)
        self.space, self.on_new, self.stopped = space, on_new, stopped
        self.queue, self.left, self.next_n = list(queue), new_trials, next_n
        self.optuna: OptunaSearch | None = None
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
        if self.stopped():
            return Searcher.FINISHED
        if self.queue:
            n, point = self.queue.pop(0)
            return {"trial": n, "point": point}
        if self.optuna is None or self.left <= 0:
            return Searcher.FINISHED
        params = self.optuna.suggest(trial_id)
        if not isinstance(params, dict):
            return params
        n, point = self.next_n, self.space.point_from(params)
        self.next_n, self.left = self.next_n + 1, self.left - 1
        self.from_optuna.add(trial_id)
        self.on_new(n, point, params)
        return {"trial": n, "point": point}

    def on_trial_complete(self, trial_id: str, result: TrialResult | None = None, error: bool = False) -> None:
        if self.optuna is not None and trial_id in self.from_optuna:
            metric = self.space.settings.metric
            scored = result is not None and isinstance(result.get(metric), (int, float))
            self.optuna.on_trial_complete(trial_id, result if scored else None, error=error or not scored)


class SweepRecorder(Callback):
    """A Tune callback that keeps each trial's entry current and says what happens to it."""

    def __init__(self, driver: TrialLedger) -> None:
        self.driver = driver

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        driver = self.driver
        with driver.lock:
            entry = driver.entry(trial.config["trial"], trial.config["point"])
            entry.state = RunState.RUNNING
            driver.save()
        driver.console.print(f"trial {entry.n} started: {entry.run_id} {' '.join(entry.overrides)}")

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: TrialResult, **info: object
    ) -> None:
        entry = self.driver.entry(trial.config["trial"])
        self.driver.refresh(entry)
        self.driver.save()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        self.driver.trial_ended(trial.config["trial"], trial.last_result or {})

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        failures = trial.run_metadata.num_failures
        limit = "unlimited" if trial.max_failures < 0 else str(trial.max_failures)
        self.driver.console.print(
            f"trial {trial.config['trial']}'s actor died ({failures} of {limit} restarts, sweep.trial_restarts); "
            f"restarting it: its run continues from its last checkpoint (Ray's error: {trial.error_file})"
        )

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        self.driver.trial_ended(trial.config["trial"], {"state": RunState.FAILED, "error": str(trial.error_file)})


class KilnTrial(tune.Trainable):
    """Drives trial `config["trial"]` (its point `config["point"]`) and reports each evaluation."""

    def setup(self, config: TrialSpec, context: SweepContext) -> None:
        self.ctx, self.n = context, int(config["trial"])
        self.run_url = RunRegistry(context.root).run_url(context.run_id(self.n))
        self.tail = MetricsTail(storage.join(self.run_url, METRICS_FILE))
        self.last_step: int = -1
        self.last_value: float | None = None
        self.pending: list[TrialResult] = []
        self.outcome: tuple[str, str | None] = (NOT_STARTED, None)
        self.ended = threading.Event()
        self.thread: threading.Thread | None = None
        if sweep_stop_requested(context.root, context.sweep_id):
            self.ended.set()  # stopped before it began: it stays NOT_STARTED for `kiln sweep resume`
            return
        console = Console(file=sys.stdout, width=200, force_terminal=False, soft_wrap=True)
        point = list(config["point"])
        self.thread = threading.Thread(
            target=self._drive, args=(point, console), name=f"kiln-trial-{self.n}", daemon=True
        )
        self.thread.start()

    def _drive(self, point: list[str], console: Console) -> None:
        try:
            self.outcome = drive_trial(self.ctx, self.n, point, console)
        finally:
            self.ended.set()

    def step(self) -> TrialResult:
        while True:
            self._read_rows()
            if self.pending:
                return self.pending.pop(0)
            if self.ended.is_set():
                self._read_rows()
                if self.pending:
                    return self.pending.pop(0)
                state, error = self.outcome
                final = {"step": max(self.last_step, 0), "state": state, "error": error, "done": True}
                if self.last_value is not None:
                    final[self.ctx.metric] = self.last_value
                return final
            self.ended.wait(POLL_S)

    def _read_rows(self) -> None:
        for row in self.tail.new_rows():
            step, value = row.get("step"), row.get(self.ctx.metric)
            # A restored run repeats the steps after its checkpoint: each evaluation is reported once.
            if isinstance(step, int) and isinstance(value, (int, float)) and step > self.last_step:
                self.last_step, self.last_value = step, float(value)
                self.pending.append({"step": step, self.ctx.metric: float(value), "state": RunState.RUNNING})

    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        # What Tune would restore is the run: `kiln sweep resume` continues it from its own checkpoint.
        return {"run_id": self.ctx.run_id(self.n)}

    def load_checkpoint(self, checkpoint: dict) -> None:
        pass  # never called: Kiln does not restore Tune experiments (see save_checkpoint)

    def cleanup(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            # Whoever ended the trial (a prune, `kiln sweep stop`) recorded why: a second event would hide a prune.
            ask_to_stop(self.run_url, "the sweep ended this trial early", event=None)
            self.thread.join(STOP_WAIT_S)
