"""Validation perplexity ``exp(total NLL / total label tokens)`` over every process's share of the data.

Never a mean of batch means: per-sequence NLL sums and token counts are gathered across processes and fed to the
repository's ``evaluate`` metric (:mod:`gin_adapter.compare.metrics.perplexity`, loaded by path because Hub
metric scripts cannot be fetched offline).
"""

from __future__ import annotations

from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from .metrics import perplexity as perplexity_metric

PERPLEXITY_METRIC = str(Path(perplexity_metric.__file__).resolve())


def load_metric() -> evaluate.EvaluationModule:
    """The perplexity metric, in memory (the first call copies the script into the ``evaluate`` modules cache)."""
    return evaluate.load(PERPLEXITY_METRIC, keep_in_memory=True)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token NLL (float64) and number of label tokens; label -100 is ignored."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")  # (B, T-1)
    return nll.double().sum(dim=1), (shift_labels != -100).sum(dim=1)


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Validation perplexity ``exp(sum NLL / sum label tokens)`` over every process's share of ``loader``.

    Per-sequence sums are gathered with ``gather_for_metrics`` (which drops the duplicates Accelerate pads the last
    batch with) and fed to the repository's ``evaluate`` metric, so every process returns the same number.
    """
    metric = load_metric()
    was_training = model.training
    model.eval()
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, tokens = sequence_nll(logits, batch["labels"])
        nll, tokens = accelerator.gather_for_metrics((nll, tokens))
        metric.add_batch(predictions=nll.cpu().tolist(), references=tokens.cpu().tolist())
    model.train(was_training)
    return metric.compute()
