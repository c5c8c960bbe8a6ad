"""What reaches MLflow params: credentials never do; training settings whose names merely contain
a hint word (token_budget) do."""

from __future__ import annotations

from mycelium.tracking.runs import looks_secret, scrub


def test_scrub_drops_credentials_and_keeps_token_budget():
    params = {
        "aws_secret_access_key": "x", "AWS_ACCESS_KEY_ID": "x", "MLFLOW_TRACKING_TOKEN": "x", "hf_token": "x",
        "db_password": "x", "openai_api_key": "x", "gcp-credentials": "x", "token": "x",
        "token_budget": "4096", "token_budget_resolved": "4096", "pass_token_budget_resolved": "2048",
        "max_length": "128", "backbone": "minilm",
    }
    kept = scrub(params)
    assert sorted(kept) == ["backbone", "max_length", "pass_token_budget_resolved", "token_budget", "token_budget_resolved"]
    assert looks_secret("HF_TOKEN") and looks_secret("auth-tokens") and not looks_secret("tokenizer")
