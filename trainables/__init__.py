"""The learning code of the TAALM orchestrator.

Everything here imports and runs without Ray: the continual-update loop (`trainables.continual`),
token-weighting schemes (`trainables.weighting`), LAMA-CKL data and metrics, model presets.
The orchestrator wraps these plain functions in Ray Train / Tune and MLflow.
"""

__version__ = "0.1.0"
