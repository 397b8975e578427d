"""The dpo section: Direct Preference Optimization's settings, read by task=dpo only (trainers/tasks/dpo.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from trainers.config.checks import one_of, require

DPO_LOSSES = ("sigmoid", "ipo", "hinge")  # trainers/tasks/preference.py computes each as TRL 1.16 does


@dataclass
class DpoConfig:
    """How far the policy may move from the reference (`beta`), which loss scores a pair, and cDPO's smoothing."""

    beta: float = 0.1  # TRL's default
    loss: str = "sigmoid"  # sigmoid (DPO), ipo (IPO), hinge (SLiC)
    # conservative DPO: the share of pairs assumed mislabelled (sigmoid only), 0 <= label_smoothing < 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        one_of("dpo.loss", self.loss, DPO_LOSSES)
        require(
            0.0 <= self.label_smoothing < 0.5,
            f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
        )
        require(
            self.label_smoothing == 0.0 or self.loss == "sigmoid",
            f"dpo.label_smoothing={self.label_smoothing} smooths dpo.loss=sigmoid only (conservative DPO), not "
            f"dpo.loss={self.loss}; remove it or use dpo.loss=sigmoid",
        )

    def changed(self) -> list[str]:
        """The keys set to something other than their default, as `dpo.KEY`."""
        default = DpoConfig()
        return [f"dpo.{f.name}" for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]


def check_dpo(dpo: DpoConfig, *, task: str, init_from: str | None, data_source: str) -> None:
    """What dpo asks of the other sections: its keys only with task=dpo; task=dpo starts from a model (its
    reference) and trains on prepared preference pairs."""
    changed = dpo.changed()
    require(
        task == "dpo" or not changed,
        f"{', '.join(changed)} is read only by task=dpo, not task={task}; remove it or add task=dpo",
    )
    if task != "dpo":
        return
    require(
        init_from is not None,
        "task=dpo needs model.init_from (a folder or run:RUN): the reference model is the model training starts from",
    )
    require(
        data_source == "prepared",
        f"task=dpo trains on preference pairs, not data.source={data_source}: give data=prepared data.path=DIR "
        "of `kiln prepare kind=preference`",
    )
