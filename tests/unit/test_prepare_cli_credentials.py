"""`kiln prepare` refuses credentials written into a URL in one line, before touching storage."""

from __future__ import annotations

import pytest

from orchestrator.cli import main

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("key", ["input", "output", "tokenizer"])
def test_credentials_in_a_prepare_url_exit_2_in_one_line_without_the_secret(no_store, tmp_path, capsys, key):
    urls = {"input": f"{tmp_path}/raw.jsonl", "output": f"{tmp_path}/out", "tokenizer": "train"}
    urls[key] = f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"
    code = main(["prepare", *(f"{k}={v}" for k, v in urls.items())])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{key} has credentials written into its URL" in err and SECRET not in err
    assert "AWS_ACCESS_KEY_ID" in err
