"""`checkpoint.async` is what users type; Python calls the field `async_upload`. Both stay true to their readers."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from orchestrator.config import UsageError, compose_config, config_keys, finalize, load_saved_config, to_yaml


def test_the_key_users_type_sets_the_field(tmp_path):
    cfg = compose_config([f"storage.root={tmp_path}", "checkpoint.async=true"])
    assert cfg.checkpoint.async_upload is True
    assert compose_config([f"storage.root={tmp_path}"]).checkpoint.async_upload is False


def test_a_bad_value_is_named_by_the_key_the_user_typed(tmp_path):
    with pytest.raises(UsageError) as error:
        compose_config([f"storage.root={tmp_path}", "checkpoint.async=sometimes"])
    assert "checkpoint.async" in str(error.value) and "async_upload" not in str(error.value)


def test_saved_config_spells_it_as_typed_and_resumes_with_it(tmp_path):
    cfg = finalize(compose_config([f"storage.root={tmp_path}", "checkpoint.async=true"]))
    saved = to_yaml(cfg)
    assert OmegaConf.create(saved).checkpoint["async"] is True and "async_upload" not in saved
    resumed = load_saved_config(saved, ["checkpoint.async=false"], "run r")
    assert resumed.checkpoint.async_upload is False
    assert load_saved_config(saved, [], "run r").checkpoint.async_upload is True


def test_listed_keys_show_the_typed_spelling():
    keys = config_keys()
    assert "checkpoint.async" in keys and "checkpoint.async_upload" not in keys
