"""difftune: transfer pre-trained diffusion models to new domains with Diff-Tuning.

Zhong, Guo, Dong, Long, "Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting",
NeurIPS 2024 (arXiv 2406.00773).
"""

__version__ = "0.1.0"
