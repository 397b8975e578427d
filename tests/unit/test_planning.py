"""The one planning pass: each check once, the plan immutable, workers handed what it resolved."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.cluster.placement import Placement, placement_problem
from orchestrator.config import UsageError, compose_config
from orchestrator.run.lifecycle import resume_command
from orchestrator.run.plan import placement_of
from tests.helpers import LLAMA_TINY


class SoloContext:
    """A one-process WorkerContext."""

    rank = local_rank = 0
    world_size = 1

    def report(self, metrics, step):
        pass

    def should_stop(self):
        return False


def test_the_placement_is_read_from_cluster_settings_once_and_frozen():
    cfg = compose_config(["cluster.num_workers=2", "cluster.cpus_per_worker=2", "cluster.resources_per_worker.foo=1"])
    placement = placement_of(cfg.cluster)
    assert placement == Placement(2, 2.0, False, (("foo", 1.0),), "pack", embedded=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement.min_workers = 1  # type: ignore[misc]
    nodes = [{"CPU": 4.0}]
    assert placement.problem(nodes) == placement_problem(2, 2.0, False, nodes, extra={"foo": 1.0})
    # This machine's estimate leaves resources other than GPUs to Ray, which reports them once it runs.
    assert placement.problem(nodes, only_gpus=True) == placement_problem(2, 2.0, False, nodes, extra={})


def test_one_resume_command_for_every_place_that_says_it(tmp_path):
    root = str(tmp_path)
    assert resume_command("r1", root) == f"kiln resume r1 --storage-root {root}"
    assert (
        resume_command("r1", root, "http://head:8265")
        == f"kiln resume r1 --address http://head:8265 --storage-root {root}"
    )
    # `kiln status` leaves out the default root, as it always did
    from data_pipeline.config import default_storage_root
    from orchestrator.config import absolute_url

    default = absolute_url(default_storage_root())
    assert resume_command("r1", default, name_default_root=False) == "kiln resume r1"
    assert resume_command("r1", root, name_default_root=False) == f"kiln resume r1 --storage-root {root}"


@pytest.mark.usefixtures("process_group")
def test_a_new_runs_plan_opens_the_data_once_and_its_worker_checks_nothing_again(tmp_path, monkeypatch):
    import trainers.run_data as run_data
    from orchestrator.run.planning import start_run
    from trainers.loop import Trainer

    opened = []
    real_open = run_data.open_training_data
    monkeypatch.setattr(run_data, "open_training_data", lambda *a: opened.append(a) or real_open(*a))
    cfg = compose_config(
        [*LLAMA_TINY, "cluster.num_workers=1", "run.id=p1", f"storage.root={tmp_path}", "tracker=none"]
    )
    plan, _registry, record = start_run(cfg, log=lambda m: None)
    assert len(opened) == 1 and record.run_id == "p1" and (tmp_path / "p1" / "tokenizer").is_dir()
    assert plan.cfg.data.path == plan.data.url and plan.data.seq_len == cfg.data.seq_len
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.data = None  # type: ignore[misc]

    def checked_again(*args, **kwargs):
        raise AssertionError("the worker checked the data again")

    monkeypatch.setattr("trainers.loop.check_run_data", checked_again)
    trainer = Trainer(plan.cfg, SoloContext(), plan.data)
    assert trainer.data is plan.data and trainer.task is not None


def test_bad_input_fails_while_planning_before_the_run_folder_exists(tmp_path):
    from orchestrator.run.planning import start_run

    cfg = compose_config(
        ["data=prepared", f"data.path={tmp_path}/missing", "run.id=r1", f"storage.root={tmp_path}/runs"]
    )
    with pytest.raises(Exception, match="missing"):
        start_run(cfg, log=lambda m: None)
    assert not (tmp_path / "runs" / "r1").exists()
    cfg = compose_config(["cluster.cpus_per_worker=4096", "run.id=r2", f"storage.root={tmp_path}/runs"])
    with pytest.raises(UsageError, match="cluster.cpus_per_worker=4096"):  # an embedded Ray could never hold it
        start_run(cfg, log=lambda m: None)
    assert not (tmp_path / "runs" / "r2").exists()
