"""Quality benchmark: teacher-forced NLL and top-1 accuracy of single models and collaborations
(weighted ensemble over a lambda grid, contrastive decoding, CoSD), scored through the engine
from prompt logprobs of r on held-out Python text (general, numeric/ML, mixed).

Modules: :mod:`~vllm_cos.quality.texts` (which files, token windows), :mod:`~vllm_cos.quality.scoring`
(NLL / top-1 arithmetic), :mod:`~vllm_cos.quality.rows` (one engine per row),
:mod:`~vllm_cos.quality.check` (cross-check with transformers + :mod:`vllm_cos.combine`),
:mod:`~vllm_cos.quality.report` (table, findings, plot), :mod:`~vllm_cos.quality.cli`
(``scripts/quality.py``).
"""

from vllm_cos.quality.cli import main

__all__ = ["main"]
