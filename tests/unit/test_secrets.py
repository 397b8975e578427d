"""Credentials never reach a saved config or W&B."""

from data_pipeline.redaction import REDACTED, redact, redact_text


def test_secret_keys_and_env_values_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    cfg = {
        "tracker": {"api_key": "abc12345678"},
        "storage": {"root": "s3://bucket/runs"},
        "note": "key is s3cr3t-value-123",
        "endpoint": "https://user:hunter22@example/x",
    }
    out = redact(cfg)
    assert out["tracker"]["api_key"] == REDACTED
    assert out["storage"]["root"] == "s3://bucket/runs"
    assert "s3cr3t" not in str(out) and "hunter22" not in str(out)
    assert redact_text("plain text") == "plain text"
