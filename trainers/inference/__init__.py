"""Using a trained model in one process: metrics and generation on a loaded model (loaded_model), chat
templates (chat) and classification predictions (predict); `kiln eval`, `generate`, `chat` and `predict`
call these."""
