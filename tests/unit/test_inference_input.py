"""What `kiln eval`/`kiln generate` accept: prompt/reference files and decoding settings (no model needed)."""

from __future__ import annotations

import pytest

from trainers.inference.loaded_model import InferenceError, Pair, Sampling, read_pairs, text_metrics


def test_pairs_are_read_one_object_a_line_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "reference": "b"}\n\n{"prompt": "c", "reference": "d", "extra": 1}\n')
    assert read_pairs(str(path)) == [Pair("a", "b"), Pair("c", "d")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"prompt": "a", "reference": "b"}\n{"prompt": "a"\n', "line 2: not JSON"),
        ('{"prompt": "a", "reference": "b"}\n\n["a", "b"]\n', "line 3: needs string"),
        ('{"prompt": "a", "reference": 3}\n', "line 1: needs string"),
        ("\n\n", "holds no rows"),
    ],
)
def test_a_bad_pairs_file_names_the_file_and_line(tmp_path, text, expected):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(InferenceError, match=expected) as info:
        read_pairs(str(path))
    assert str(path) in str(info.value)


def test_a_missing_pairs_file_is_named(tmp_path):
    with pytest.raises(InferenceError, match="no file at .*missing.jsonl"):
        read_pairs(str(tmp_path / "missing.jsonl"))


def test_decoding_is_greedy_unless_sampling_is_asked_for():
    assert Sampling().greedy and Sampling(temperature=0).greedy and Sampling(seed=3).greedy
    assert not Sampling(temperature=0.7).greedy and not Sampling(top_k=5).greedy and not Sampling(top_p=0.9).greedy
    config = Sampling(temperature=0.7).generation_config([0], 0)
    assert config.do_sample and config.top_k == 0 and config.top_p == 1.0  # no hidden top-k=50 default
    assert not Sampling().generation_config([0], 0).do_sample


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"temperature": -1}, "--temperature"),
        ({"top_k": 0}, "--top-k"),
        ({"top_p": 1.5}, "--top-p"),
        ({"temperature": 0, "top_k": 5}, "greedy"),
    ],
)
def test_impossible_decoding_settings_are_refused(settings, message):
    with pytest.raises(InferenceError, match=message):
        Sampling(**settings)


def test_text_metrics_are_sacrebleus_corpus_scores():
    scores = text_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    same = "the same five words here"
    assert text_metrics([same], [same]) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}


def test_a_folders_recorded_kiln_task_wins_when_its_model_class_fits():
    from trainers.inference.loaded_model import folder_task

    assert folder_task("sft", "causal_lm") == "sft"  # an SFT export is a causal LM to transformers
    assert folder_task(None, "causal_lm") == "causal_lm"  # a folder Kiln did not write
    assert folder_task("classification", "causal_lm") == "causal_lm"  # a record that does not fit is not trusted
    assert folder_task("nonsense", "mlm") == "mlm" and folder_task("sft", None) is None
    assert folder_task("dpo", "causal_lm") == "causal_lm"  # a DPO export: its reference stayed with its run
