"""The workloads that ``fusedmlp bench`` and ``fusedmlp profile`` both measure: named MLP shapes
(presets.py), the variants of a case built one way for both (variants.py), Hugging Face models
from their configs (hf_models.py) and timing (timing.py)."""
