"""Using a trained model in one CPU process: validation metrics, text generation, BLEU and chrF.

`kiln eval` (orchestrator/cli/evaluate.py) and `kiln generate` (orchestrator/cli/inference.py) are thin
wrappers over this module: they find the model (a run's checkpoint or a Hugging Face folder) and the data;
everything here works on a loaded model and knows nothing about runs or their registry.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from data_pipeline import storage
from data_pipeline import tokenizer as bpe
from data_pipeline.dataset import Dataset
from data_pipeline.examples import generation_stops
from data_pipeline.stream import TokenStream
from trainers.config import DpoConfig, ModelConfig, TaskConfig
from trainers.pretrained import folder_labels
from trainers.task_data import PRETRAINED_CLASS, task_for_architectures
from trainers.tasks import Task, task_batch

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

CPU = torch.device("cpu")


class InferenceError(ValueError):
    """Input `kiln eval`/`kiln generate` cannot use; the message names it and says what to do."""


@dataclass
class LoadedModel:
    """A model ready for inference on CPU, its tokenizer, the task it was trained for, and its name in messages."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    task: TaskConfig = field(default_factory=TaskConfig)  # a folder's, from its config.json; a run's, its config's
    seq_len: int | None = None  # the rows the model trained on: a run's data.seq_len, a folder's kiln_seq_len

    @property
    def context(self) -> int | None:
        """The longest sequence the model takes (positions), if its config says."""
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def eos_id(self) -> int:
        """The end-of-text token id: generation stops there and pads with it."""
        eos = self.tokenizer.eos_token_id
        config: PretrainedConfig = self.model.config
        return int(eos if eos is not None else config.eos_token_id)

    @property
    def pad_id(self) -> int:
        """What generation pads with: the tokenizer's pad, else its EOS."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Where generation stops: EOS, the chat template's end-of-turn tokens and the model's own stop ids."""
        held = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return generation_stops(self.tokenizer, held) or [self.eos_id]

    def build_task(self, seed: int = 0, dpo: DpoConfig | None = None) -> Task:
        """The task the model was trained for, to evaluate or predict with (seed: the run's train.seed, which
        task=mlm draws its masks from; dpo: a task=dpo run's dpo section)."""
        from trainers.tasks import build_task

        return build_task(self.task, self.eos_id, seed=seed, vocabulary=vocabulary(self), dpo=dpo)


def load_folder(path: str) -> LoadedModel:
    """A model and its tokenizer from a local Hugging Face folder (as `kiln export` writes); no hub.

    Its task comes from config.json's architectures (a classifier's classes from its id2label).
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    quiet_transformers()
    if not os.path.isdir(path):
        raise InferenceError(f"no folder at {path}: give a run id or a Hugging Face model folder (kiln export)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InferenceError(
            f"{path} is not a Hugging Face model folder (no config.json): give a folder written by "
            "`kiln export RUN --out DIR` or a run id"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        architectures = getattr(config, "architectures", None) or []
        task = folder_task(getattr(config, "kiln_task", None), task_for_architectures(architectures))
        if task is None:
            raise InferenceError(
                f"{path} holds a {', '.join(architectures) or config.model_type} model, which no Kiln task scores: "
                "kiln eval/generate/predict handle causal LMs (task=causal_lm, sft), masked LMs (task=mlm) and "
                "sequence classifiers (task=classification)"
            )
        # safetensors only: never unpickle weights read from storage (a pytorch_model.bin folder is refused)
        auto_class = getattr(transformers, PRETRAINED_CLASS[task])
        model = auto_class.from_pretrained(path, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except InferenceError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise InferenceError(f"cannot load the model in {path} ({message}): is it a complete `kiln export`?") from None
    task_cfg = TaskConfig(task, labels=folder_labels(config))
    return LoadedModel(model.float().eval(), tokenizer, path, task_cfg, getattr(config, "kiln_seq_len", None))


def folder_task(recorded: str | None, from_architectures: str | None) -> str | None:
    """The task a folder's model is scored as: the Kiln task its export recorded (config.json `kiln_task`), if
    the model's class fits it (an SFT export is a causal LM), else the one its architectures name."""
    if recorded == "dpo":  # a DPO model's reference log-probs stay with its run: its folder is a causal LM
        return from_architectures
    fits = recorded in PRETRAINED_CLASS and from_architectures is not None
    if fits and PRETRAINED_CLASS[str(recorded)] == PRETRAINED_CLASS[str(from_architectures)]:
        return recorded
    return from_architectures


def load_checkpoint(
    task_cfg: TaskConfig,
    model_cfg: ModelConfig,
    checkpoint_url: str,
    strategy: str,
    tokenizer_url: str,
    merge: bool = True,
) -> LoadedModel:
    """A run's model from any strategy's checkpoint (the export code path, kept in memory) and its tokenizer;
    task_cfg and model_cfg are the run's. LoRA adapters are merged into the model unless merge is False."""
    from trainers.export import model_from_checkpoint

    quiet_transformers()
    with warnings.catch_warnings():  # DCP's note that it reads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        model = model_from_checkpoint(task_cfg, model_cfg, checkpoint_url, strategy, tokenizer_url, merge)
    return LoadedModel(model, bpe.load(tokenizer_url), checkpoint_url, task_cfg)


def quiet_transformers() -> None:
    """Only transformers' errors on the terminal: its progress bars and config notes are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def vocabulary(loaded: LoadedModel) -> bpe.Vocabulary:
    """The ids of the model's tokenizer (task=mlm masks with them, as the run did)."""
    return bpe.vocabulary(loaded.tokenizer)


def check_vocabulary(loaded: LoadedModel, dataset: Dataset) -> None:
    """The dataset must have been tokenized with the model's tokenizer, else its ids mean other tokens."""
    data_vocab = bpe.load(dataset.tokenizer_url).get_vocab()
    model_vocab = loaded.tokenizer.get_vocab()
    if data_vocab != model_vocab:
        raise InferenceError(
            f"the dataset at {dataset.url} was prepared with a different tokenizer (vocabulary of "
            f"{len(data_vocab)}) than {loaded.name} (vocabulary of {len(model_vocab)}): prepare it with the "
            "model's tokenizer (kiln prepare tokenizer=...)"
        )


def validation_metrics(
    task: Task,
    model: nn.Module,
    datasets: Sequence[Dataset],
    weights: Sequence[float] | None,
    *,
    micro_batch: int,
    batches: int,
    seed: int,
    world_size: int = 1,
) -> dict[str, float]:
    """The task's val/* metrics over the first `batches` micro-batches of every rank's slice of the split.

    The same slices, order and summation as trainers/evaluation.py's Evaluator: rank r of world_size
    reads its own micro-batches of the unshuffled validation stream. Here one process evaluates each
    rank's slice in turn and sums the statistics, as the run's all-reduce did, so the numbers equal
    what a run of world_size workers logged (in fp32; a bf16/fp16 run's logged numbers carry its
    rounding).
    """
    sums: dict[str, float] = {}
    for rank in range(world_size):
        stream = TokenStream(
            datasets,
            "val",
            rank=rank,
            world_size=world_size,
            micro_batch=micro_batch,
            seed=seed,
            shuffle=False,
            weights=weights,
        )
        try:
            rank_sums = task.evaluate(model, (task_batch(task, next(stream), "val", CPU) for _ in range(batches)))
        finally:
            stream.close()
        for key, value in rank_sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return task.summarize(sums)


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy unless a temperature > 0, top-k or top-p asks for sampling."""

    max_new_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InferenceError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise InferenceError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InferenceError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InferenceError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise InferenceError(
                "--temperature 0 means greedy decoding: drop --top-k/--top-p or give a temperature > 0"
            )

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the most likely token every time."""
        return not self.temperature and self.top_k is None and self.top_p is None

    def generation_config(self, stop_ids: list[int], pad_id: int) -> GenerationConfig:
        """The transformers GenerationConfig for these settings (every sampling knob explicit), stopping at any of
        stop_ids."""
        from transformers import GenerationConfig

        common: dict[str, object] = {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": stop_ids,
            "pad_token_id": pad_id,
            "use_cache": True,
        }
        if self.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature or 1.0,
            top_k=self.top_k or 0,  # 0: no top-k filter
            top_p=self.top_p if self.top_p is not None else 1.0,
            **common,
        )


def generate(
    loaded: LoadedModel,
    prompts: Iterable[str],
    sampling: Sampling,
    note: Callable[[str], None] = lambda _: None,
    chat: bool = False,
) -> Iterable[str]:
    """Each prompt's completion (the new text only), through transformers' `generate`, one at a time.

    With a seed, each prompt's sampling starts from that seed, so a completion depends only on its
    prompt and the settings, not on the prompts before it. With chat, each prompt is one user message in
    the model's chat template (trainers/inference/chat.py), and the completion is the assistant's reply.
    """
    if chat:
        check_speaks_chat(loaded)
    can_generate = getattr(loaded.model, "can_generate", None)
    if can_generate is None or not can_generate():
        raise InferenceError(
            f"{loaded.name} is not a causal LM ({type(loaded.model).__name__}): it cannot generate text"
        )
    config = sampling.generation_config(loaded.stop_ids, loaded.pad_id)
    context = loaded.context
    if context is not None and sampling.max_new_tokens >= context:
        raise InferenceError(
            f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt: {loaded.name} "
            f"takes {context} tokens in all"
        )
    if not sampling.greedy and sampling.seed is None:
        torch.seed()  # a fresh draw each call, not torch's fixed default seed
    for number, prompt in enumerate(prompts, 1):
        if chat:
            ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": prompt}])
        else:
            # as pretraining documents were encoded: with the tokenizer's own specials (a Llama BOS)
            ids = bpe.text_ids(loaded.tokenizer, prompt) or [loaded.eos_id]
        ids, new_tokens, cut = fit_context(ids, sampling.max_new_tokens, context, chat)
        if cut is not None:
            note(f"prompt {number}: {cut}")
        input_ids = torch.tensor([ids], dtype=torch.long)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            output = loaded.model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config if new_tokens == sampling.max_new_tokens else shorter(config, new_tokens),
            )
        completion = loaded.tokenizer.decode(output[0, input_ids.shape[1] :].tolist(), skip_special_tokens=True)
        yield completion.rstrip("\n") if chat else completion  # a reply ends with the template's newline


def fit_context(
    ids: list[int], max_new_tokens: int, context: int | None, chat: bool
) -> tuple[list[int], int, str | None]:
    """A prompt's ids and how many tokens to generate after them, within the model's context (None: no limit),
    and a note of what was cut to fit (None if nothing): a conversation shorter than the context keeps all its ids
    and gets fewer new tokens; any other prompt keeps its last ids."""
    if context is None or len(ids) + max_new_tokens <= context:
        return ids, max_new_tokens, None
    if chat and len(ids) < context:
        # A conversation cut at its start loses its BOS and header, which no training row lacked:
        # the reply gets fewer tokens instead.
        new_tokens = context - len(ids)
        return ids, new_tokens, f"{len(ids)} tokens in the chat template, {new_tokens} left for the reply"
    keep = context - max_new_tokens
    return ids[-keep:], max_new_tokens, f"{len(ids)} tokens, kept the last {keep} (the model takes {context} in all)"


def shorter(config: GenerationConfig, max_new_tokens: int) -> GenerationConfig:
    """A copy of a GenerationConfig that generates at most max_new_tokens."""
    copied = copy.deepcopy(config)
    copied.max_new_tokens = max_new_tokens
    return copied


def check_speaks_chat(loaded: LoadedModel) -> None:
    """InferenceError unless the model's tokenizer has a chat template."""
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise InferenceError(
            f"{loaded.name} has no chat template (its tokenizer has no chat_template): chatting needs a model whose "
            "tokenizer has one, e.g. a task=sft run on `kiln prepare kind=chat` data, or a folder `kiln export` "
            "wrote from one"
        )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation so far in the tokenizer's chat template, ending where the assistant's reply
    begins: what `kiln prepare kind=chat` stored before each reply (both render with apply_chat_template)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


@dataclass(frozen=True)
class Pair:
    """One row of a prompt/reference file."""

    prompt: str
    reference: str


def read_pairs(url: str) -> list[Pair]:
    """The {"prompt", "reference"} rows of a JSONL file; a bad line is an error naming its number."""
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        raise InferenceError(f'no file at {url}: give a JSONL file of {{"prompt", "reference"}} rows') from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InferenceError(f"{url} line {number}: not JSON ({exc.msg}); write one object a line") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "reference")):
            raise InferenceError(
                f'{url} line {number}: needs string "prompt" and "reference" fields, got '
                f"{sorted(row) if isinstance(row, dict) else type(row).__name__}"
            )
        pairs.append(Pair(row["prompt"], row["reference"]))
    if not pairs:
        raise InferenceError(f'{url} holds no rows: write one {{"prompt", "reference"}} object a line')
    return pairs


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults) of the generated texts against one reference each."""
    import sacrebleu

    return {
        "bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score),
        "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score),
    }
