"""Adapters for training frameworks: each attaches a cdgrad transform to the framework's own optimizers.

* `cdgrad.integrations.lightning.TransformCallback`: a Lightning `Callback` (`pip install cdgrad[lightning]`).
* `cdgrad.integrations.huggingface.TransformCallback`: a Hugging Face `TrainerCallback`
  (`pip install cdgrad[huggingface]`).

Each module imports its framework; importing this package imports neither.
"""
