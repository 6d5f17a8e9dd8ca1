"""Corpus perplexity from summed token log-likelihoods, as an ``evaluate`` metric.

Hub metric scripts cannot be fetched offline, so this module is kept in the
repository and loaded by path::

    import evaluate
    from gin_adapter.compare.metrics import perplexity
    metric = evaluate.load(perplexity.__file__, keep_in_memory=True)
    metric.add_batch(predictions=nll_sums, references=token_counts)
    metric.compute()  # {"perplexity": ..., "nll": ..., "tokens": ...}

Unlike the Hub ``perplexity`` metric (which runs a model itself and averages
per-text perplexities), this one takes, for each sequence or batch, the *sum* of
the token negative log-likelihoods (natural log) and the number of label tokens
that sum covers, and returns ``exp(sum of NLL / sum of tokens)``: the corpus
perplexity, not a mean of batch means. Gather the per-sequence values over all
processes before adding them (``accelerator.gather_for_metrics``).
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Corpus perplexity exp(sum NLL / sum label tokens) from per-sequence NLL sums and token counts."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): summed negative log-likelihood (natural log) of the label tokens of each sequence/batch.
    references (list of int): number of label tokens each sum covers (padding and ignored positions excluded).
Returns:
    perplexity (float): exp(sum(predictions) / sum(references)).
    nll (float): mean NLL per token, sum(predictions) / sum(references).
    tokens (int): sum(references).
Examples:
    >>> metric = evaluate.load("gin_adapter/compare/metrics/perplexity.py", keep_in_memory=True)
    >>> metric.compute(predictions=[2.0, 4.0], references=[2, 2])["perplexity"]  # exp(6 / 4)
    4.4816890703380645
"""

_CITATION = """\
@misc{buehler2025graphaware,
  title={Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers},
  author={Markus J. Buehler}, year={2025}, eprint={2501.02393}, archivePrefix={arXiv}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenPerplexity(evaluate.Metric):
    """``exp(sum NLL / sum tokens)`` over everything added with ``add_batch``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[float], references: list[int]) -> dict[str, float]:
        nll = np.asarray(predictions, dtype=np.float64)
        tokens = np.asarray(references, dtype=np.int64)
        total_tokens = int(tokens.sum())
        if total_tokens <= 0:
            raise ValueError("perplexity needs at least one label token; the evaluation set is empty or fully masked.")
        if (tokens < 0).any():
            raise ValueError("token counts (references) must be >= 0.")
        mean_nll = float(nll.sum()) / total_tokens
        return {"perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf, "nll": mean_nll, "tokens": total_tokens}
