"""`model.init_from`: its spelling, the settings it makes ignored, the folder checks the driver runs, and
every rank's load (built here from a tiny GPT-2 saved locally; nothing is downloaded)."""

from __future__ import annotations

import pytest

from orchestrator.config import UsageError, compose_config
from trainers.config import ConfigError, ModelConfig, TaskConfig, parse_init_run

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny GPT-2 Hugging Face folder (config, safetensors, tokenizer) and its tokenizer's vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_pipeline import tokenizer as bpe

    path = tmp_path_factory.mktemp("hf")
    tokenizer = bpe.train_bpe(TEXTS, vocab_size=300)
    bpe.save(tokenizer, str(path / "tok"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path / "model")
    bpe.load(str(path / "tok")).save_pretrained(path / "model")
    return path / "model", dict(tokenizer.get_vocab())


def test_run_sources_parse_and_misspellings_name_the_field():
    assert parse_init_run("run:pre") == ("pre", None)
    assert parse_init_run("run:pre@20") == ("pre", 20)
    assert parse_init_run("./out") is None
    for bad in ("run:", "run:pre@", "run:pre@x", "run:a b"):
        with pytest.raises(ConfigError, match="model.init_from=.*run:RUN or run:RUN@STEP"):
            ModelConfig(init_from=bad)


def test_a_shape_the_folder_decides_is_an_ignored_setting():
    with pytest.raises(ConfigError, match=r"model.n_layer=2 is ignored with model.init_from=/m"):
        ModelConfig(init_from="/m", n_layer=2)
    ModelConfig(init_from="/m", attn_implementation="eager", activation_checkpointing=True)  # still apply


@pytest.mark.parametrize(
    "override", ["model.n_layer=4", "model=gpt2_small", "model.vocab_size=512", "model.n_positions=256"]
)
def test_command_line_shapes_with_init_from_are_refused_even_at_their_default(override):
    with pytest.raises(UsageError, match="ignored with model.init_from"):
        compose_config(["model.init_from=/some/folder", override])


def test_the_folder_decides_positions_so_a_long_seq_len_is_checked_against_it_later():
    cfg = compose_config(["model.init_from=/some/folder", "data.seq_len=512"])  # > gpt2_tiny's 256: not ours
    assert cfg.model.init_from == "/some/folder"


def test_folder_checks_name_the_folder_and_the_fix(folder, tmp_path):
    from transformers import BertConfig

    from trainers.pretrained import PretrainedError, inspect_folder

    def fails(path, match):
        with pytest.raises(PretrainedError, match=match) as raised:
            inspect_folder(str(path), "AutoModelForCausalLM", "causal_lm")
        assert "\n" not in str(raised.value)

    fails(tmp_path / "nope", r"model.init_from=.*/nope: no such folder")
    fails(tmp_path, r"is not a Hugging Face model folder \(no config.json\)")
    BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, architectures=["BertForMaskedLM"]
    ).save_pretrained(tmp_path / "bert")
    fails(tmp_path / "bert", r"holds a BertForMaskedLM model, which task=causal_lm cannot train")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((folder[0] / "config.json").read_text())
    fails(tmp_path / "noweights", "has no safetensors weights")
    model = inspect_folder(str(folder[0]), "AutoModelForCausalLM", "causal_lm")
    assert (model.architecture, model.vocab_size, model.positions) == ("GPT2LMHeadModel", 320, 32)
    assert model.tokenizer_vocab == folder[1]


def test_a_gpt2_folder_is_refused_for_masked_lm_in_one_line(folder):
    from trainers.pretrained import PretrainedError, inspect_folder
    from trainers.task_data import PRETRAINED_CLASS

    with pytest.raises(PretrainedError, match=r"holds a GPT2LMHeadModel model, which task=mlm cannot train") as raised:
        inspect_folder(str(folder[0]), PRETRAINED_CLASS["mlm"], "mlm")
    assert "AutoModelForMaskedLM" in str(raised.value) and "\n" not in str(raised.value)


def test_data_with_another_tokenizer_or_longer_sequences_is_refused(folder):
    from trainers.pretrained import PretrainedError, check_data, inspect_folder

    model = inspect_folder(str(folder[0]), "AutoModelForCausalLM", "causal_lm")
    check_data(model, "M", "/data", folder[1], 32)
    other = {f"t{i}": i for i in range(512)}
    size = len(folder[1])
    with pytest.raises(
        PretrainedError, match=rf"the tokenizer of M \(vocabulary of {size} tokens\).*/data.*512 tokens"
    ) as raised:
        check_data(model, "M", "/data", other, 32)
    assert f"kiln prepare tokenizer={folder[0]} " in str(raised.value)
    with pytest.raises(PretrainedError, match=r"data.seq_len=64 is longer than M takes \(32 positions\)"):
        check_data(model, "M", "/data", folder[1], 64)


def test_every_rank_loads_the_folder_s_weights_in_training_mode(folder):
    import torch
    from safetensors.torch import load_file

    from trainers.tasks import build_model, build_task

    saved = load_file(str(folder[0] / "model.safetensors"))
    for name in ("causal_lm", "sft"):  # torch's RNG does not matter: the weights are the folder's
        torch.manual_seed(len(name))
        model = build_model(build_task(TaskConfig(name), 0), ModelConfig(init_from=str(folder[0])), 300, 0)
        assert model.training and not model.config.use_cache
        state = model.state_dict()
        for key, tensor in saved.items():
            assert torch.equal(state[key], tensor), key


def test_a_run_copies_only_the_model_files_of_its_source(folder, tmp_path):
    import shutil

    from orchestrator.run.init_source import InitSource

    source = tmp_path / "source"
    shutil.copytree(folder[0], source)
    (source / "notes.txt").write_text("not a model file")
    (source / "pytorch_model.bin").write_bytes(b"a pickle")
    (source / "optimizer").mkdir()
    InitSource(folder=str(source), target=str(tmp_path / "run" / "init_model")).install()
    copied = sorted(p.name for p in (tmp_path / "run" / "init_model").iterdir())
    assert "config.json" in copied and "model.safetensors" in copied and "tokenizer.json" in copied
    assert not {"notes.txt", "pytorch_model.bin", "optimizer"} & set(copied)
    assert not any((tmp_path / "run" / "init_model" / name).is_symlink() for name in copied)


def test_a_submission_checks_init_from_from_here_without_copying_it(folder, tmp_path, monkeypatch):
    """kiln submit's check (orchestrator/run/plan.py plan_submission), with data prepared on the cluster."""
    import json

    from orchestrator.run.planning import check_submission_source

    (tmp_path / "pre" / "checkpoints").mkdir(parents=True)  # a run whose checkpoints are not there
    (tmp_path / "pre" / "run.json").write_text(json.dumps({"run_id": "pre", "state": "SUCCEEDED"}))
    (tmp_path / "pre" / "config.yaml").write_text("run:\n  id: pre\n")

    def fails(source, match):
        cfg = compose_config([f"model.init_from={source}", f"storage.root={tmp_path}"])
        with pytest.raises(UsageError, match=match) as raised:
            check_submission_source(cfg, None)
        assert "\n" not in str(raised.value) and f"model.init_from={source}" in str(raised.value)

    monkeypatch.chdir(folder[0].parent)
    fails("model", rf"is not an absolute path.*starts on the cluster.*model.init_from={folder[0]}\)")
    fails(tmp_path / "missing", "no such folder")
    fails("run:nope", "unknown run 'nope'")
    fails("run:pre@7", "run pre has no checkpoint at step 7")
    cfg = compose_config([f"model.init_from={folder[0]}", f"storage.root={tmp_path}"])
    check_submission_source(cfg, None)
    assert cfg.model.init_from == str(folder[0]) and [p.name for p in tmp_path.iterdir()] == ["pre"]  # nothing copied


def test_workers_load_the_copy_from_remote_storage(folder):
    """A run on object storage (memory:// stands in for s3://): the copy is uploaded and every rank loads it."""
    import torch
    from safetensors.torch import load_file

    from orchestrator.run.init_source import InitSource
    from trainers.tasks import build_model, build_task

    target = "memory://kiln-init-from-test/run/init_model"
    InitSource(folder=str(folder[0]), target=target).install()
    model = build_model(build_task(TaskConfig("causal_lm"), 0), ModelConfig(init_from=target), 300, 0)
    state = model.state_dict()
    for key, tensor in load_file(str(folder[0] / "model.safetensors")).items():
        assert torch.equal(state[key], tensor), key


def test_a_llama_folder_whose_tokenizer_outgrows_its_embedding_is_refused_in_one_line(tmp_path):
    """The export bug this guards against added a token past a Llama model's last embedding row."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipeline import tokenizer as bpe
    from tests.tokenizer_folders import LLAMA3, save_tokenizer
    from trainers.pretrained import PretrainedError, inspect_folder

    tokenizer = save_tokenizer(LLAMA3, tmp_path / "model")
    size = len(bpe.load(str(tokenizer)))
    torch.manual_seed(0)
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    LlamaForCausalLM(LlamaConfig(vocab_size=size - 1, **shape)).save_pretrained(tmp_path / "model")
    with pytest.raises(PretrainedError) as raised:
        inspect_folder(str(tmp_path / "model"), "AutoModelForCausalLM", "sft")
    message = str(raised.value)
    assert f"embeds {size - 1} tokens but its tokenizer has {size}" in message and "\n" not in message
    assert "resize_token_embeddings" in message
    LlamaForCausalLM(LlamaConfig(vocab_size=size, **shape)).save_pretrained(tmp_path / "model")
    assert inspect_folder(str(tmp_path / "model"), "AutoModelForCausalLM", "sft").architecture == "LlamaForCausalLM"


def test_a_folder_parallel_tensor_cannot_split_is_refused_before_anything_starts(folder, tmp_path):
    """parallel.tensor with model.init_from: the folder's own arch and heads are checked by the driver."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipeline import tokenizer as bpe
    from orchestrator.run.planning import check_submission_source

    torch.manual_seed(0)
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "max_position_embeddings": 32}
    LlamaForCausalLM(
        LlamaConfig(vocab_size=320, num_attention_heads=2, num_key_value_heads=1, **shape)
    ).save_pretrained(tmp_path / "llama")
    bpe.load(str(folder[0])).save_pretrained(tmp_path / "llama")
    mesh = ["strategy=fsdp", "parallel.tensor=2", "cluster.num_workers=2", f"storage.root={tmp_path}"]
    for path, expected in [
        (folder[0], "parallel.tensor=2 with a gpt2 model (model.init_from="),
        (tmp_path / "llama", "parallel.tensor=2 must divide the 2 query and 1 key/value heads (model.init_from="),
    ]:
        cfg = compose_config([f"model.init_from={path}", *mesh])
        with pytest.raises(UsageError) as raised:
            check_submission_source(cfg, None)
        assert expected in str(raised.value) and "\n" not in str(raised.value), raised.value
