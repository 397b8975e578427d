"""task=classification as a user meets it: macro F1 as sklearn computes it, the real last text token scored by a
decoder and only the text attended by an encoder (so an exported model agrees with a Hugging Face user feeding the
bare text), one class is cross entropy and not regression, ranks' counts sum, the data's label map becomes the run's
classes, and `kiln predict` encodes a text as `kiln prepare` stored it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.batch import Batch
from data_pipeline.dataset import DatasetError, ExampleWriter, example_row
from trainers.config import ConfigError, ModelConfig, TaskConfig
from trainers.task_data import class_names, run_labels, task_for_architectures
from trainers.tasks import build_task
from trainers.tasks.classification import Classification, class_counts, f1_macro, text_mask

EOS = 0
VOCAB = 40
LABELS = ["neg", "neu", "pos"]
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 16}


def f1_of(truth: list[int], predicted: list[int], classes: int) -> float:
    return f1_macro(class_counts(torch.tensor(predicted), torch.tensor(truth), classes), classes)


def test_f1_macro_is_sklearns_on_hand_computed_cases():
    # perfect
    assert f1_of([0, 1, 2], [0, 1, 2], 3) == 1.0
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: tp 0, fp 1, fn 0 -> 0
    assert f1_of([0, 0, 1, 1], [0, 2, 1, 0], 3) == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    # class 2 is in neither the truth nor the predictions: left out of the mean, as sklearn's labels are
    assert f1_of([0, 1, 1], [0, 1, 0], 3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    # a class only predicted (never true) counts with F1 0
    assert f1_of([0, 0], [0, 1], 3) == pytest.approx((2 / 3 + 0.0) / 2)


def test_text_mask_covers_the_text_up_to_its_last_token_even_an_eos_inside_it():
    rows = torch.tensor([[5, 6, EOS, EOS], [5, EOS, 6, EOS], [7, 8, 9, EOS]])
    assert text_mask(rows, EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]


def test_a_stored_row_is_the_text_cut_to_seq_len_minus_one_then_eos(tmp_path):
    assert example_row([3, 4], 5, EOS).tolist() == [3, 4, EOS, EOS, EOS]
    assert example_row([1, 2, 3, 4, 5, 6], 4, EOS).tolist() == [1, 2, 3, EOS]  # always one EOS after the text
    writer = ExampleWriter(str(tmp_path), "val", seq_len=4, vocab_size=VOCAB, eos_id=EOS)
    writer.add([1, 2, 3, 4, 5, 6], 2)
    writer.close()
    stored = np.fromfile(tmp_path / "val" / "shard_00000.bin", dtype="<u2")
    assert stored.tolist() == example_row([1, 2, 3, 4, 5, 6], 4, EOS).tolist()  # prepare and predict agree


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_a_padded_row_scores_as_the_bare_text_does(arch):
    """The decoder scores the text's last token, the encoder sees the text only: padding changes nothing, so a
    Hugging Face user calling the exported model on the text gets the logits Kiln trained and evaluated."""
    torch.manual_seed(0)
    task = Classification(LABELS, EOS)
    model = task.build_model(ModelConfig(arch=arch, **TINY), VOCAB, EOS).eval()
    text = [5, 9, 3, 11]
    padded = torch.from_numpy(example_row(text, 12, EOS))[None]
    with torch.no_grad():
        bare = model(input_ids=torch.tensor([text])).logits
        other_last = model(input_ids=torch.tensor([text[:-1]])).logits
        scored = task.logits(model, padded)
    torch.testing.assert_close(scored, bare.float())
    assert not torch.allclose(scored, other_last.float())  # it is the last token that is scored
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}


def test_one_class_is_cross_entropy_not_regression():
    torch.manual_seed(0)
    task = Classification(["only"], EOS)
    model = task.build_model(ModelConfig(**TINY), VOCAB, EOS)
    loss = task.loss(model, Batch(torch.randint(1, VOCAB, (2, 6)), labels=torch.zeros(2, dtype=torch.int64)))
    assert float(loss.detach()) == 0.0  # log softmax of a single class; transformers would regress the logit onto 0


def test_ranks_counts_sum_to_the_whole_sets_metrics():
    torch.manual_seed(0)
    task = Classification(LABELS, EOS)
    model = task.build_model(ModelConfig(**TINY), VOCAB, EOS).eval()
    rows = torch.from_numpy(np.stack([example_row(list(range(1 + i % 5, 4 + i)), 10, EOS) for i in range(6)]))
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    whole = task.evaluate(model, [Batch(rows, labels=labels)])
    rank0 = task.evaluate(model, [Batch(rows[:4], labels=labels[:4])])
    rank1 = task.evaluate(model, [Batch(rows[4:], labels=labels[4:])])
    pooled = task.summarize({k: rank0[k] + rank1[k] for k in rank0})
    assert pooled == pytest.approx(task.summarize(whole))
    predicted = task.logits(model, rows).argmax(-1)
    assert pooled["val/accuracy"] == pytest.approx(float((predicted == labels).float().mean()))
    assert pooled["val/f1_macro"] == pytest.approx(f1_of(labels.tolist(), predicted.tolist(), 3))
    assert set(pooled) == {"val/loss", "val/accuracy", "val/f1_macro"}


def test_the_data_label_map_is_the_runs_classes_and_task_labels_must_match_it():
    class Data:
        url, kind, label_map = "/data/cls", "classification", {"pos": 2, "neg": 0, "neu": 1}

    assert class_names(Data.label_map) == LABELS
    assert run_labels(None, [Data()]) == LABELS
    assert run_labels(LABELS, [Data()]) == LABELS  # a resumed run's saved config
    with pytest.raises(DatasetError, match=r"task.labels=\['a', 'b'\] but the dataset at /data/cls labels"):
        run_labels(["a", "b"], [Data()])

    class Pretrain:
        url, kind, label_map = "/data/pre", "pretrain", None

    with pytest.raises(DatasetError, match="kiln prepare kind=classification"):
        run_labels(None, [Pretrain()])


def test_task_labels_are_classifications_alone():
    assert build_task(TaskConfig("classification", labels=LABELS), EOS).labels == LABELS  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="task.labels is read only by task=classification, not task=causal_lm"):
        TaskConfig("causal_lm", labels=["a"])
    with pytest.raises(ConfigError, match="must not repeat"):
        TaskConfig("classification", labels=["a", "a"])


def test_a_folders_architecture_says_its_task():
    assert task_for_architectures(["GPT2ForSequenceClassification"]) == "classification"
    assert task_for_architectures(["BertForSequenceClassification"]) == "classification"
    assert task_for_architectures(["GPT2LMHeadModel"]) == "causal_lm"
    assert task_for_architectures(["T5EncoderModel"]) is None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny GPT-2 causal LM folder and a GPT-2 classifier folder (labels a, b), with a Kiln tokenizer each."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from data_pipeline import tokenizer as bpe

    path = tmp_path_factory.mktemp("hf")
    bpe.save(bpe.train_bpe(["good match", "bad rain"] * 10, vocab_size=300), str(path / "tok"))
    torch.manual_seed(0)
    shape = {"vocab_size": 320, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "eos_token_id": EOS}
    GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(path / "lm")
    labelled = GPT2Config(**shape, pad_token_id=EOS, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    GPT2ForSequenceClassification(labelled).save_pretrained(path / "classifier")
    for name in ("lm", "classifier"):
        bpe.load(str(path / "tok")).save_pretrained(path / name)
    return path


def test_init_from_a_language_model_gets_a_new_head_for_the_datas_classes(folders):
    from trainers.pretrained import check_folder_labels, inspect_folder
    from trainers.tasks import build_model

    lm = str(folders / "lm")
    assert inspect_folder(lm, "AutoModelForSequenceClassification", "classification").architecture == "GPT2LMHeadModel"
    check_folder_labels(lm, "model.init_from=lm", LABELS)  # a language model has no classes of its own
    model = build_model(
        build_task(TaskConfig("classification", labels=LABELS), EOS), ModelConfig(init_from=lm), 300, EOS
    )
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.pad_token_id == EOS


def test_init_from_a_classifier_with_other_labels_is_refused_in_one_line(folders):
    from trainers.pretrained import PretrainedError, check_folder_labels

    check_folder_labels(str(folders / "classifier"), "model.init_from=c", ["a", "b"])
    with pytest.raises(PretrainedError) as refused:
        check_folder_labels(str(folders / "classifier"), "model.init_from=c", LABELS)
    message = str(refused.value)
    assert "model.init_from=c classifies into ['a', 'b'] but the data's label map is ['neg', 'neu', 'pos']" in message
    assert "\n" not in message


def test_predict_scores_a_text_as_its_stored_row_and_refuses_a_language_model(folders):
    from trainers.inference.loaded_model import InferenceError, load_folder
    from trainers.inference.predict import predict

    loaded = load_folder(str(folders / "classifier"))
    assert loaded.task == TaskConfig("classification", labels=["a", "b"])
    (prediction,) = predict(loaded, ["good match"], seq_len=16)
    ids = loaded.tokenizer("good match", add_special_tokens=False)["input_ids"]
    row = torch.from_numpy(example_row(ids, 16, EOS))[None]
    expected = torch.softmax(loaded.build_task().logits(loaded.model, row)[0], -1)  # type: ignore[attr-defined]
    assert list(prediction.probabilities.values()) == pytest.approx(expected.tolist())
    assert prediction.label == ["a", "b"][int(expected.argmax())]
    with pytest.raises(InferenceError, match="is a task=causal_lm model, not a classifier"):
        list(predict(load_folder(str(folders / "lm")), ["good match"], seq_len=16))
    with pytest.raises(InferenceError, match="text 2 is empty"):
        list(predict(loaded, ["good", "  "], seq_len=16))


def test_a_mixture_of_classification_sets_with_other_label_maps_is_refused_naming_both(tmp_path):
    from types import SimpleNamespace

    from data_pipeline.dataset import open_training_data, write_manifest

    def prepared(name: str, labels: dict[str, int]) -> str:
        body = {"kind": "classification", "seq_len": 8, "vocab_size": VOCAB, "eos_id": EOS, "dtype": "<u2"}
        write_manifest(str(tmp_path / name), {**body, "tokenizer": {"sha256": "t"}, "label_map": labels, "splits": {}})
        return str(tmp_path / name)

    same = [prepared("a", {"x": 0, "y": 1}), prepared("b", {"x": 0, "y": 1})]
    mixture = [SimpleNamespace(path=p, weight=1.0) for p in same]
    assert len(open_training_data("mixture", None, mixture)[0]) == 2
    other = [SimpleNamespace(path=p, weight=1.0) for p in (same[0], prepared("c", {"x": 0, "z": 1}))]
    with pytest.raises(DatasetError) as refused:
        open_training_data("mixture", None, other)
    message = str(refused.value)
    assert f"{tmp_path / 'c'} has a different label map than {tmp_path / 'a'}" in message and "\n" not in message
