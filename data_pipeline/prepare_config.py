"""`kiln prepare`'s settings (PrepareConfig), the error that stops it and the summary of what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.dataset import OVERFLOW
from data_pipeline.records import ENGINES
from data_pipeline.sources import FORMATS

KINDS = ("pretrain", "chat", "classification", "preference")


class PrepareError(ValueError):
    """Bad input to `kiln prepare` that stops it; the message names the file, line or setting."""


@dataclass
class PrepareConfig:
    """Settings of `kiln prepare` (passed as key=value overrides)."""

    input: str = "???"
    output: str = "???"
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = "train"  # "train", or a transformers tokenizer folder (a model's, or a prepared dataset)
    vocab_size: int = 8192
    seq_len: int = 1024
    val_fraction: float = 0.01
    on_bad_record: str = "skip"
    kind: str = "pretrain"
    batch_size: int = 256  # documents per tokenizer call
    # kind=chat: a conversation longer than seq_len is cut there (its start kept) or dropped; counted either way.
    # kind=preference: the same for each sequence of a pair (prompt + answer), as TRL cuts it (the prompt kept)
    overflow: str = "truncate"
    # where records are read and tokenized: Ray Data ("ray"), this process ("local"), or by the inputs' size ("auto")
    engine: str = "auto"

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            if getattr(self, name) in ("???", "", None):
                raise PrepareError(f"{name}= is required, e.g. kiln prepare input='data/*.jsonl' output=prepared/")
        if self.format not in ("auto", *FORMATS):
            raise PrepareError(f"format must be one of auto, {', '.join(FORMATS)}; got {self.format!r}")
        if self.on_bad_record not in ("skip", "fail"):
            raise PrepareError(f"on_bad_record must be skip or fail; got {self.on_bad_record!r}")
        if self.kind not in KINDS:
            raise PrepareError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind == "preference" and self.tokenizer == "train":
            raise PrepareError(
                "kind=preference needs the tokenizer of the model DPO fine-tunes: give its folder with tokenizer=PATH "
                "(tokenizer=train makes a new vocabulary that no trained model reads)"
            )
        if self.seq_len < 8:
            raise PrepareError(f"seq_len must be >= 8, got {self.seq_len}")
        if not 256 < self.vocab_size <= 2**20:
            raise PrepareError(f"vocab_size must be in (256, 1048576], got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 0.5:
            raise PrepareError(
                f"val_fraction must be in (0, 0.5), got {self.val_fraction}: training evaluates "
                "on the validation split, so it needs a share of the documents (e.g. 0.05)"
            )
        if self.batch_size < 1:
            raise PrepareError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.engine not in ENGINES:
            raise PrepareError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.overflow not in OVERFLOW:
            raise PrepareError(f"overflow must be one of {', '.join(OVERFLOW)}; got {self.overflow!r}")


@dataclass
class PrepareSummary:
    """What a preparation did (printed at the end, and kept in the manifest)."""

    output: str
    reused: bool
    documents: int = 0
    tokens: int = 0
    bad_records: int = 0
    empty_documents: int = 0
    truncated: int = 0  # kind=chat: conversations cut at seq_len; kind=preference: pairs with an answer cut there
    # kind=chat: conversations longer than seq_len left out (overflow=drop, or nothing left to learn);
    # kind=preference: pairs whose prompt alone fills seq_len (or that overflow=drop would cut)
    dropped: int = 0
    identical: int = 0  # kind=preference: pairs left out because their answers are the same once cut at seq_len
    prompt_mismatch: int = 0  # kind=preference: pairs whose prompt tokenizes differently before an answer (TRL warns)
    shards: int = 0
    wall_s: float = 0.0
    bad_examples: list[str] = field(default_factory=list)
    # split name -> its manifest entry; set once the splits are written. Kept out of repr and ==, and
    # out of the manifest's "summary" (the manifest holds it under "splits").
    splits: dict[str, dict] = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens_per_s(self) -> float:
        """Throughput over the whole preparation."""
        return self.tokens / self.wall_s if self.wall_s else 0.0
