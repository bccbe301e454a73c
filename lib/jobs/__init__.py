"""Async prediction jobs: the runner, the webhook receiver, the ledger, webhook authentication.
Never imported by predict.py."""
