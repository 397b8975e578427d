"""The sweep's Tune searcher: trial numbers survive a resume, and Optuna starts from the finished trials."""

from __future__ import annotations

from orchestrator.sweep.space import plan_sweep
from orchestrator.sweep.tune_adapter import TrialSource

SHORT = "train.max_steps=4"


def optuna_space(*overrides: str):
    return plan_sweep([SHORT, *overrides, "sweep.search=optuna", "sweep.num_trials=5"]).space


def test_queued_trials_keep_their_numbers_then_optuna_numbers_new_ones_after_the_highest():
    space = optuna_space("optim.lr=tag(log,interval(1e-5,1e-2))", "model.n_layer=1,2")
    recorded: list[tuple[int, list[str]]] = []
    source = TrialSource(
        queue=[(3, ["optim.lr=0.001", "model.n_layer=2"])],  # a trial the dead driver left unfinished
        space=space,
        new_trials=2,
        next_n=4,
        evaluated=[({"optim.lr": 1e-3, "model.n_layer": "1"}, 5.5), ({"optim.lr": 3e-4, "model.n_layer": "2"}, 5.9)],
        on_new=lambda n, point, params: recorded.append((n, point)),
        stopped=lambda: False,
    )
    first = source.suggest("a")
    assert first == {"trial": 3, "point": ["optim.lr=0.001", "model.n_layer=2"]}
    fourth, fifth = source.suggest("b"), source.suggest("c")
    assert [fourth["trial"], fifth["trial"]] == [4, 5]
    assert [n for n, _ in recorded] == [4, 5]
    for suggestion in (fourth, fifth):
        lr, layers = suggestion["point"]
        assert 1e-5 <= float(lr.removeprefix("optim.lr=")) <= 1e-2 and layers in ("model.n_layer=1", "model.n_layer=2")
    assert source.suggest("d") == source.FINISHED  # the budget is spent
    # The study knows the two finished trials it was seeded with, and learns the new ones' results.
    study = source.optuna._ot_study
    assert sorted(t.value for t in study.trials if t.value is not None) == [5.5, 5.9]
    source.on_trial_complete("b", {"val/loss": 5.0, "step": 4})
    source.on_trial_complete("c", {"step": 0})  # failed before any evaluation: no value to learn
    assert sorted(t.value for t in study.trials if t.value is not None) == [5.0, 5.5, 5.9]


def test_a_stopped_sweep_suggests_nothing_more():
    space = optuna_space("optim.lr=1e-3,3e-3")
    source = TrialSource([(1, ["optim.lr=0.001"])], space, 3, 2, [], lambda *a: None, stopped=lambda: True)
    assert source.suggest("a") == source.FINISHED


def test_only_the_adapters_import_tune_or_ray_train_at_their_top():
    """`kiln status` and the sweep's decisions never load Tune: the adapters are imported inside functions."""
    import ast
    from pathlib import Path

    adapters = {"orchestrator/sweep/tune_adapter.py", "orchestrator/launch/ray_worker.py"}
    found = set()
    for path in Path("orchestrator").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n == "ray" or n.startswith(("ray.tune", "ray.train")) for n in names):
                found.add(path.as_posix())
    assert found == adapters
