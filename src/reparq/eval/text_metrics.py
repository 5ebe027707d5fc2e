"""Metrics for the text models: embedding agreement (MiniLM) and perplexity (LLaMA).

A quantized sentence encoder is judged against its own float version, not against labels:
``embedding_cosine`` is the mean cosine similarity of each sentence's quantized embedding
to its float one, and ``retrieval_agreement`` the share of sentences whose nearest
neighbour (among the other sentences, by cosine) is the same under both models; that is
what a semantic-search user would notice. A language model is judged by perplexity,
``exp`` of the mean next-token negative log-likelihood over every predicted token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.errors import ReparqError


def _check_pair(fp: torch.Tensor, quant: torch.Tensor) -> None:
    if fp.shape != quant.shape or fp.ndim != 2 or fp.shape[0] == 0:
        raise ReparqError(f"embeddings must be two non-empty [N, D] tensors of the same shape, "
                          f"got {tuple(fp.shape)} and {tuple(quant.shape)}")


def sentence_cosines(fp: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """cos(fp_i, quant_i) per sentence (float64, [N]): the items a paired test compares."""
    _check_pair(fp, quant)
    return F.cosine_similarity(fp.double(), quant.double(), dim=1)


def embedding_cosine(fp: torch.Tensor, quant: torch.Tensor) -> float:
    """Mean over sentences of cos(fp_i, quant_i)."""
    return sentence_cosines(fp, quant).mean().item()


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar *other* row (ties: the lowest index)."""
    if emb.shape[0] < 2:
        raise ReparqError("nearest-neighbour retrieval needs at least two sentences")
    e = F.normalize(emb.double(), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(dim=1)


def retrieval_agreement(fp: torch.Tensor, quant: torch.Tensor) -> float:
    """Share of sentences whose top-1 neighbour is the same under the float and the quantized model."""
    _check_pair(fp, quant)
    return (nearest_neighbours(fp) == nearest_neighbours(quant)).double().mean().item()


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each token window [N, T] (float64, [N]).

    Kept per window because windows are the independent items a paired test between two
    quantized models compares (:mod:`reparq.eval.significance`); the model may return logits or
    an object with ``.logits``.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ReparqError(f"perplexity needs token windows of shape [N, T>=2], got {tuple(windows.shape)}")
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = _logits(model(input_ids=ids)).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(nll.double().mean(dim=1))
    return torch.cat(out)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Perplexity of a causal LM on token windows [N, T] (each window scored on its own).

    Every window predicts its tokens 2..T from the ones before, so the score is a mean over
    N * (T - 1) tokens (windows have one length, so the mean of the windows' means).
    """
    return perplexity_of(window_nll(model, windows, batch_size))


def perplexity_of(nll: torch.Tensor) -> float:
    """Perplexity from per-window mean NLLs of equal-length windows."""
    mean_nll = float(nll.double().mean())
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
    if not math.isfinite(ppl):
        raise ReparqError("perplexity is not finite: the model produced non-finite logits")
    return ppl
