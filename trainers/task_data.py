"""What each task needs from its data, checked on the driver before any worker starts.

Kept apart from the task registry (`trainers/tasks/`, which loads torch and transformers) so that the
driver and the config can name the tasks and check a dataset cheaply.

- `causal_lm` learns every token of any dataset. On chat data it ignores the stored loss mask (the
  prompts are learned too; a note says so); on classification data it ignores the labels.
- `sft` learns only the tokens a chat loss mask marks (`kiln prepare kind=chat`): other data fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from data_pipeline.batch import LABELS, LOSS_MASK
from data_pipeline.dataset import Dataset, DatasetError

# task name -> the fields every batch must carry besides tokens
TASK_NEEDS: dict[str, tuple[str, ...]] = {"causal_lm": (), "sft": (LOSS_MASK,)}

# task name -> the transformers Auto class a `model.init_from` folder is loaded with (trainers/pretrained.py);
# a masked-LM or classification task adds AutoModelForMaskedLM / AutoModelForSequenceClassification here.
PRETRAINED_CLASS: dict[str, str] = {"causal_lm": "AutoModelForCausalLM", "sft": "AutoModelForCausalLM"}

# field -> (what it is, the `kiln prepare` kind that stores it)
FIELD_SOURCES = {
    LOSS_MASK: ("a per-token loss mask", "kind=chat"),
    LABELS: ("a label per sequence", "kind=classification"),
}


def check_task_data(task: str, datasets: Sequence[Dataset], log: Callable[[str], None]) -> None:
    """Fail naming the dataset and the fix if `task` cannot learn from it; note stored fields it ignores."""
    needs = TASK_NEEDS.get(task, ())
    for dataset in datasets:
        for field in needs:
            if field not in dataset.fields:
                what, kind = FIELD_SOURCES[field]
                raise DatasetError(
                    f"task={task} trains on {what}, but the dataset at {dataset.url} (kind={dataset.kind}) "
                    f"stores none; prepare the data with `kiln prepare {kind} ...`, or train on it with task=causal_lm"
                )
        ignored = [FIELD_SOURCES[f][0] for f in dataset.fields if f not in needs]
        if ignored:
            hint = "; task=sft learns only the replies" if LOSS_MASK in dataset.fields else ""
            log(
                f"task={task} ignores {' and '.join(ignored)} stored in {dataset.url} (kind={dataset.kind}) "
                f"and learns every token{hint}"
            )
