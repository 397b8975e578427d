"""task=dpo without processes: its settings refused in one line, the reference pass's schedule, how a batch of pairs
reaches the loss, what a step logs, and the committed reference log-probs (read back, or refused when damaged)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_pipeline.batch import Batch
from data_pipeline.dataset import DatasetError
from tests.helpers import config_refused as refused
from trainers.checkpoint import reference as artefact
from trainers.config import DpoConfig
from trainers.reference import reference_batches
from trainers.step_window import FIELDS, StepWindow, summarize
from trainers.task_data import check_task_data
from trainers.tasks.dpo import DPO, disable_dropout
from trainers.tasks.preference import PAIR_STATS

PAIRS = ["task=dpo", "data=prepared", "data.path=/datasets/pairs", "model.init_from=/models/base"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([*PAIRS, "dpo.beta=0"], "dpo.beta must be > 0, got 0"),
        ([*PAIRS, "dpo.loss=kto"], "dpo.loss must be one of sigmoid, ipo, hinge; got 'kto'"),
        ([*PAIRS, "dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5), got 0.5"),
        (
            [*PAIRS, "dpo.loss=ipo", "dpo.label_smoothing=0.1"],
            "dpo.label_smoothing=0.1 smooths dpo.loss=sigmoid only (conservative DPO), not dpo.loss=ipo",
        ),
        (["dpo.beta=0.5"], "dpo.beta is read only by task=dpo, not task=causal_lm; remove it or add task=dpo"),
        (["task=dpo"], "task=dpo needs model.init_from (a folder or run:RUN): the reference model is the model"),
        (["task=dpo", "model.init_from=/m"], "task=dpo trains on preference pairs, not data.source=stdlib"),
        (
            [*PAIRS, "strategy=fsdp", "parallel.tensor=2"],
            "parallel.tensor=2 with task=dpo: tensor parallel splits a causal LM's layers and head",
        ),
    ],
)
def test_dpo_settings_a_run_cannot_use_are_refused_in_one_line_naming_the_key(overrides, expected):
    assert expected in refused(*overrides)


def test_the_dpo_section_reaches_the_run_as_typed():
    from orchestrator.config import compose_config

    cfg = compose_config([*PAIRS, "dpo.beta=0.5", "dpo.label_smoothing=0.2"])
    assert cfg.dpo == DpoConfig(beta=0.5, loss="sigmoid", label_smoothing=0.2) and cfg.task.name == "dpo"


def dataset(kind: str, fields: tuple[str, ...] = ("loss_mask",)):
    return SimpleNamespace(kind=kind, url=f"/datasets/{kind}", fields=fields)


def test_preference_pairs_train_task_dpo_alone_and_task_dpo_trains_on_nothing_else():
    check_task_data("dpo", [dataset("preference")], print)
    for task in ("sft", "causal_lm", "mlm", "classification"):
        with pytest.raises(DatasetError) as refusal:
            check_task_data(task, [dataset("preference")], print)
        assert f"task={task} cannot train on the kind=preference dataset at /datasets/preference: only task=dpo" in (
            str(refusal.value)
        )
    with pytest.raises(
        DatasetError, match="task=dpo trains on kind=preference data, but the dataset at /datasets/chat"
    ):
        check_task_data("dpo", [dataset("chat")], print)


@pytest.mark.parametrize("pairs", [1, 5, 8, 13])
@pytest.mark.parametrize("micro_batch", [1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_reference_pass_scores_every_pair_once_with_as_many_forwards_on_every_rank(pairs, micro_batch, world):
    schedules = [reference_batches(pairs, micro_batch, rank, world) for rank in range(world)]
    assert len({len(schedule) for schedule in schedules}) == 1  # collective forwards line up
    kept = sorted(int(i) for schedule in schedules for b in schedule for i in b.indices[b.keep])
    assert kept == list(range(pairs))
    assert all(len(b.indices) == micro_batch for schedule in schedules for b in schedule)


def test_reference_batches_are_the_evaluators_val_batches():
    """The Evaluator reads the unshuffled split, rank r's batch j being positions [(j D + r) m, (j D + r + 1) m)."""
    world, micro_batch = 2, 3
    for rank in range(world):
        for j, batch in enumerate(reference_batches(20, micro_batch, rank, world)):
            first = (j * world + rank) * micro_batch
            assert batch.indices.tolist() == [p % 20 for p in range(first, first + micro_batch)]


def pairs_batch() -> Batch[np.ndarray]:
    """Two pairs of 4-token rows: pair k's chosen row is 10k + (0..3), its rejected row 10k + 5 + (0..3)."""
    tokens = np.array([[10 * k + t for t in (0, 1, 2, 3, 5, 6, 7, 8)] for k in (1, 2)])
    mask = np.array([[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 1, 0]], dtype=np.uint8)
    return Batch(tokens, loss_mask=mask, positions=np.array([7, 8]), indices=np.array([3, 0]))


def test_a_batch_of_pairs_becomes_chosen_rows_then_rejected_rows_with_each_pairs_reference():
    task = DPO()
    task.attach_reference({"train": np.arange(8, dtype=np.float32).reshape(4, 2), "val": np.zeros((1, 2))})
    rows = task.host_batch(pairs_batch(), "train")
    assert rows.tokens.tolist() == [[10, 11, 12, 13], [20, 21, 22, 23], [15, 16, 17, 18], [25, 26, 27, 28]]
    assert rows.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]]
    assert rows.reference.tolist() == [[6.0, 7.0], [0.0, 1.0]]  # pairs 3 and 0 of train
    assert rows.indices.tolist() == [3, 0] and rows.positions.tolist() == [7, 8]


def test_a_batch_before_the_reference_is_attached_is_an_error():
    with pytest.raises(RuntimeError, match="before the reference log-probs"):
        DPO().host_batch(pairs_batch(), "train")


class Scripted(torch.nn.Module):
    """A 'model' whose logits put log-prob `logp` on every token id (a uniform vocabulary of 2**k ids)."""

    def __init__(self, vocab: int = 32, dropout: float = 0.1):
        super().__init__()
        self.vocab, self.drop = vocab, torch.nn.Dropout(dropout)
        self.config = SimpleNamespace(attention_dropout=dropout)

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros((*input_ids.shape, self.vocab)))


def test_at_the_reference_every_pair_has_zero_rewards_and_the_sigmoid_loss_is_log_2():
    task, model = DPO(dpo=DpoConfig(beta=0.1)), Scripted()
    u = -math.log(32)  # every token's log-prob under the scripted model
    # answer log-probs: the masked tokens after the first position, u each (pair 3: 2 and 3 tokens, pair 0: 2 and 1)
    task.attach_reference({"train": np.array([[2 * u, u], [0, 0], [0, 0], [2 * u, 3 * u]], np.float32)})
    batch = task.host_batch(pairs_batch(), "train").map(torch.from_numpy)
    loss, stats = task.loss_and_stats(model, batch)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    metrics = task.train_metrics(stats.tolist())
    assert stats[0] == 2 and set(metrics) == {f"train/{name}" for name in PAIR_STATS}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[f"train/{name}"] == pytest.approx(0.0, abs=1e-6), name
    assert metrics["train/logps/chosen"] == pytest.approx(2 * u) and metrics["train/logps/rejected"] == pytest.approx(
        2 * u
    )
    sums = task.evaluate(model, [batch])
    assert task.summarize(sums)["val/loss"] == pytest.approx(math.log(2), rel=1e-6) and sums["pairs"] == 2


def test_dropout_is_off_in_a_dpo_model():
    model = disable_dropout(Scripted(dropout=0.1))
    assert model.drop.p == 0.0 and model.config.attention_dropout == 0.0


def test_the_tasks_step_sums_are_added_over_the_ranks_between_the_fields_and_the_router():
    base = [2.0, 1.0, 0.0, 4.0, 0.4, 4.0, 0.0, 100.0]
    assert len(base) == len(FIELDS)
    rows = [[*base, 2.0, 0.5, -1.0, 0.25, 3.0, 1.0], [*base, 2.0, 0.1, 1.0, 0.75, 1.0, 3.0]]
    summary = summarize(rows, experts=2, task_columns=3)
    assert summary.task_sums == (4.0, 0.6, 0.0)
    assert summary.moe_aux_loss == 0.5 and summary.expert_load_max_over_mean == 1.0  # router columns after them
    assert summarize([base, base]).task_sums == ()


def test_the_window_keeps_the_last_steps_sums_on_the_device_until_the_sync():
    window = StepWindow(torch.device("cpu"), task_columns=2)
    window.add(torch.tensor(1.0), 0.5, torch.tensor([2.0, 0.3], dtype=torch.float64))
    window.add(torch.tensor(0.9), 0.5, torch.tensor([2.0, 0.7], dtype=torch.float64))
    assert window.task_sums.tolist() == [2.0, 0.7]
    window.open()
    assert window.task_sums.tolist() == [0.0, 0.0]


FACTS = {"url": "/datasets/pairs", "fingerprint": "f", "tokenizer_sha256": "t", "pairs": {"train": 3, "val": 2}}


def committed(tmp_path):
    url = artefact.reference_url(str(tmp_path))
    tables = {"train": np.array([[-1.5, -2.0], [-3.0, -0.5], [-7.25, -8.0]]), "val": np.array([[-1.0, -2.0]] * 2)}
    digest = artefact.commit(url, tables, world_size=2, strategy="ddp", data=FACTS, how={"batch_pairs": 2})
    return url, tables, digest


def test_committed_reference_log_probs_are_read_back_as_written(tmp_path):
    assert artefact.decide(artefact.reference_url(str(tmp_path)), FACTS) == artefact.Decision("compute")
    url, tables, digest = committed(tmp_path)
    decision = artefact.decide(url, FACTS)
    assert decision == artefact.Decision("read", digest) and artefact.damaged(url) is None
    read = artefact.read(url, digest, FACTS["pairs"])
    assert {split: read[split].tolist() for split in read} == {split: t.tolist() for split, t in tables.items()}
    manifest = json.loads((tmp_path / "reference" / "MANIFEST.json").read_text())
    assert manifest["step"] == 0 and manifest["data"] == FACTS and manifest["columns"] == ["chosen", "rejected"]


def test_a_damaged_reference_is_refused_in_one_line_naming_it_never_computed_again(tmp_path):
    url, _, _ = committed(tmp_path)
    path = tmp_path / "reference" / "logps.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    decision = artefact.decide(url, FACTS)
    assert decision.action == "refuse" and "\n" not in decision.detail
    assert f"the reference log-probs of this task=dpo run at {url} are damaged" in decision.detail
    assert "logps.safetensors does not match its sha256" in decision.detail
    assert artefact.damaged(url) == decision.detail  # what `kiln resume` and torchrun's --resume refuse with


def test_reference_log_probs_of_other_data_are_refused(tmp_path):
    url, _, _ = committed(tmp_path)
    decision = artefact.decide(url, {**FACTS, "pairs": {"train": 4, "val": 2}})
    assert decision.action == "refuse" and "the dataset was prepared again under the run" in decision.detail
