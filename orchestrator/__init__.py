"""The orchestrator: CLI, config handling, and (later) Ray Tune / MLflow assembly around trainables."""
