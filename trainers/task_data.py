"""What each task needs from its data, checked on the driver before any worker starts.

Kept apart from the task registry (`trainers/tasks/`, which loads torch and transformers) so that the
driver and the config can name the tasks and check a dataset cheaply.

- `causal_lm` learns every token of any dataset. On chat data it ignores the stored loss mask (the
  prompts are learned too; a note says so); on classification data it ignores the labels.
- `sft` learns only the tokens a chat loss mask marks (`kiln prepare kind=chat`): other data fails.
- `mlm` learns from any dataset whose tokenizer has the mask token (every `kiln prepare` since it was added).
- `dpo` learns from preference pairs (`kind=preference`, and no other task reads them): each pair's chosen and
  rejected answer, marked by the mask, against the reference model's log-probabilities of them.
- `classification` learns the label of each sequence (`kiln prepare kind=classification`): other data fails.
  Its classes are the dataset's label map; the driver writes them into the run's config (`task.labels`), so a
  checkpoint's class names travel with the run (eval, predict, export) without the data.

It also says which model architectures (`model.arch`) each task trains, checked when the config is built, and
which task a Hugging Face folder's model is for (`task_for_architectures`, read from its config.json).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from data_pipeline import tokenizer as bpe
from data_pipeline.batch import LABELS, LOSS_MASK
from data_pipeline.dataset import Dataset, DatasetError

# task name -> the fields every batch must carry besides tokens
TASK_NEEDS: dict[str, tuple[str, ...]] = {
    "causal_lm": (),
    "sft": (LOSS_MASK,),
    "mlm": (),
    "classification": (LABELS,),
    "dpo": (LOSS_MASK,),  # the answers' mask of each pair
}
# task name -> the one `kiln prepare` kind it trains on (a task not named here trains on every kind but these)
TASK_KINDS: dict[str, str] = {"dpo": "preference"}
# the tasks whose models generate text (kiln generate, kiln chat, kiln eval --data pairs.jsonl)
GENERATIVE_TASKS: tuple[str, ...] = ("causal_lm", "sft", "dpo")
# task name -> the special tokens its data's tokenizer must have (a tokenizer's own, as its configuration names them)
TASK_TOKENS: dict[str, tuple[str, ...]] = {"mlm": ("mask_token",)}

# task name -> the transformers Auto class a `model.init_from` folder is loaded with (trainers/pretrained.py)
PRETRAINED_CLASS: dict[str, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",
    "mlm": "AutoModelForMaskedLM",
    # a sequence-classification folder, or a language model's (its head is then new: pretrained.NEW_HEAD_CLASSES)
    "classification": "AutoModelForSequenceClassification",
    "dpo": "AutoModelForCausalLM",
}

# the ending of a Hugging Face model class name (config.json `architectures`) -> the task that scores it
ARCHITECTURE_TASKS: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "classification"),
    ("ForMaskedLM", "mlm"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
)

# the decoders without experts (qwen3_moe and mixtral have them)
DENSE_DECODERS = ("gpt2", "llama", "qwen2", "qwen3", "mistral")
# task name -> the model.arch values it trains (a model.init_from folder is checked by PRETRAINED_CLASS instead)
TASK_ARCHS: dict[str, tuple[str, ...]] = {
    "causal_lm": (*DENSE_DECODERS, "qwen3_moe", "mixtral"),
    "sft": (*DENSE_DECODERS, "qwen3_moe", "mixtral"),
    "mlm": ("bert",),
    # a decoder's last text token, or an encoder's pooled first position. Not the MoE decoders: transformers'
    # sequence-classification heads drop the router logits, so their experts would train without load balancing.
    "classification": (*DENSE_DECODERS, "bert"),
    "dpo": (*DENSE_DECODERS, "qwen3_moe", "mixtral"),  # always from model.init_from: its reference
}

# model.arch -> the model=... config entries of that architecture (conf/model/), named in errors
ARCH_MODELS: dict[str, tuple[str, ...]] = {
    "gpt2": ("gpt2_tiny", "gpt2_small"),
    "bert": ("bert_tiny", "bert_small"),
    "llama": ("llama3_tiny", "llama3_1b", "llama3_8b"),
    "qwen2": (),
    "qwen3": ("qwen3_0_6b",),
    "mistral": (),
    "qwen3_moe": ("qwen3_moe_tiny",),
    "mixtral": (),
}

# field -> (what it is, the `kiln prepare` kind that stores it)
FIELD_SOURCES = {
    LOSS_MASK: ("a per-token loss mask", "kind=chat"),
    LABELS: ("a label per sequence", "kind=classification"),
}


def task_for_architectures(architectures: Sequence[str]) -> str | None:
    """The task a Hugging Face folder's model is for, from its config's `architectures` (None: none Kiln knows)."""
    for architecture in architectures:
        for ending, task in ARCHITECTURE_TASKS:
            if architecture.endswith(ending):
                return task
    return None


def arch_error(task: str, arch: str) -> str | None:
    """Why task cannot train a model.arch=arch model built from config (with the fix), or None if it can."""
    archs = TASK_ARCHS.get(task, ())
    if arch in archs:
        return None
    choices = " or ".join(f"model={m}" for a in archs for m in ARCH_MODELS.get(a, ()))
    return (
        f"task.name={task} does not train model.arch={arch} models; it trains model.arch={'|'.join(archs)}: "
        f"choose {choices} (or model.init_from a folder of that kind)"
    )


def check_task_data(task: str, datasets: Sequence[Dataset], log: Callable[[str], None]) -> None:
    """Fail naming the dataset and the fix if `task` cannot learn from it; note stored fields it ignores."""
    needs = TASK_NEEDS.get(task, ())
    for dataset in datasets:
        check_kind(task, dataset)
        if TASK_TOKENS.get(task):
            tokenizer = bpe.load(dataset.tokenizer_url)
            missing = [name for name in TASK_TOKENS[task] if getattr(tokenizer, f"{name}_id", None) is None]
            if missing:
                raise DatasetError(
                    f"task={task} needs a {' and '.join(missing)} in the tokenizer, but the dataset at "
                    f"{dataset.url} was prepared with a tokenizer without one (an older Kiln's, or a folder whose "
                    "tokenizer_config.json names none); prepare it again with `kiln prepare`"
                )
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


def check_kind(task: str, dataset: Dataset) -> None:
    """Fail naming the fix unless `task` trains on the dataset's kind: a task with its own kind (TASK_KINDS) on
    that kind only, every other task on any kind but those (pairs would teach sft the rejected answers too)."""
    own = TASK_KINDS.get(task)
    if own is not None and dataset.kind != own:
        raise DatasetError(
            f"task={task} trains on kind={own} data, but the dataset at {dataset.url} is kind={dataset.kind}; "
            f"prepare the data with `kiln prepare kind={own} ...`"
        )
    owners = [name for name, kind in TASK_KINDS.items() if kind == dataset.kind]
    if own is None and owners:
        raise DatasetError(
            f"task={task} cannot train on the kind={dataset.kind} dataset at {dataset.url}: only "
            f"task={'|'.join(owners)} reads its examples; use task={owners[0]} or prepare the data with another kind"
        )


def class_names(label_map: dict[str, int]) -> list[str]:
    """A label map's names in class-id order (ids are 0..n-1, as `kiln prepare` makes them)."""
    names = sorted(label_map, key=label_map.__getitem__)
    if [label_map[name] for name in names] != list(range(len(names))):
        raise DatasetError(f"label map {label_map} does not number its labels 0..{len(names) - 1}")
    return names


def data_labels(datasets: Sequence[Dataset]) -> list[str]:
    """The class names (in class-id order) of classification data; a mixture's parts share one map (checked
    when it is opened)."""
    labels = datasets[0].label_map
    if not labels:
        raise DatasetError(
            f"the dataset at {datasets[0].url} (kind={datasets[0].kind}) has no label map; "
            "prepare it with `kiln prepare kind=classification ...`"
        )
    return class_names(labels)


def run_labels(configured: Sequence[str] | None, datasets: Sequence[Dataset]) -> list[str]:
    """task=classification's classes: the data's, which task.labels (the run's saved config) must equal if set."""
    labels = data_labels(datasets)
    if configured is not None and list(configured) != labels:
        raise DatasetError(
            f"task.labels={list(configured)} but the dataset at {datasets[0].url} labels its classes {labels}: "
            "a run's classes are its data's; remove task.labels or train on data with those labels"
        )
    return labels
