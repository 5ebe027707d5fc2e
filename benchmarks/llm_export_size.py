"""File size of the Hugging Face W4A16 export at a real LLM shape (TinyLlama-1.1B's config, random
weights): the issue's "W4A16 file <= 0.3x the float16 checkpoint" measured on a model whose
embedding is not a quarter of it, as the zoo decoders' is (``llm_export.md``).

Size does not depend on trained weights, so the architecture is built from its config with
random weights, saved as a float16 checkpoint (``save_pretrained``), quantized round-to-nearest
(``minmax``, weight-only: no calibration data shapes the file) and exported with
``reparq.export_hf``. Rows: per-channel and grouped scales, with reparq's default 8-bit first and
last layers and with every layer at 4 bits (``keep_first_last_8bit=False``). The export's logits
are checked against reparq's model on two short random windows (transformers' load).

Usage: ``OMP_NUM_THREADS=2 python benchmarks/llm_export_size.py`` (about 10 minutes, 16 GB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import reparq
from reparq.deploy.hf_check import directory_size_mb
from reparq.report.results import source_version, write_results

RESULTS = Path(__file__).parent / "results"
# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json): the shape only
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=False, rms_norm_eps=1e-5)
VARIANTS = {
    "per channel": {},
    "group 128": {"w_group_size": 128},
    "per channel, all 4-bit": {"keep_first_last_8bit": False},
    "group 128, all 4-bit": {"w_group_size": 128, "keep_first_last_8bit": False},
}
NOTES = """Model: LlamaForCausalLM with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV
heads, intermediate 5632, vocabulary 32000, untied embedding), random init (seed 0), saved as a
float16 `save_pretrained` checkpoint (`fp16_mb`). reparq `minmax` W4A16 (weight-only, symmetric,
round to nearest; calibration: 2 random 32-token windows, which weight-only ranges do not use),
exported with `reparq.export_hf` (compressed-tensors `pack-quantized`). `size_mb`: the export's
safetensors; `ratio` = size_mb / fp16_mb (target <= 0.3). Default (`keep_first_last_8bit`): the first
quantized layer and `lm_head` stay 8-bit; "all 4-bit" quantizes them at 4 bits too. The embedding
stays float16 in every row (vLLM does not quantize embeddings). `max_logit_diff`: transformers'
load of the export against reparq's model, two 32-token windows (weight-only: the same weights)."""


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows, code = [], source_version()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.float16).save_pretrained(tmp / "fp16")
        fp16_mb = directory_size_mb(tmp / "fp16")
        ids = torch.randint(0, SHAPE["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
        for name in args.variants:
            start = time.time()
            model = AutoModelForCausalLM.from_pretrained(tmp / "fp16", dtype=torch.float32).eval()
            model.config.use_cache = False
            q = reparq.quantize(model, ids, recipe="minmax", w_bits=4, a_bits=16, batch_size=2, **VARIANTS[name])
            out = reparq.export_hf(q, tmp / "hf")
            size = directory_size_mb(out)
            with torch.no_grad():
                ref = q(input_ids=ids).logits
            del q, model
            hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            with torch.no_grad():
                diff = float((hf(input_ids=ids).logits - ref).abs().max())
            del hf
            row = {"model": "tinyllama-1.1b shape (random)", "method": "minmax", "scheme": f"W4A16 {name}",
                   "w_bits": 4, "a_bits": 16, "size_mb": round(size, 1), "fp16_mb": round(fp16_mb, 1),
                   "ratio": round(size / fp16_mb, 3), "target": "<= 0.3", "max_logit_diff": float(f"{diff:.3g}"),
                   "seconds": round(time.time() - start, 1), "code": code}
            rows.append(row)
            print(row, flush=True)
            _write(args, argv, rows)  # after every row: a long run that is stopped keeps what it measured
            for f in out.iterdir():
                f.unlink()
            out.rmdir()
    return 0


def _write(args, argv, rows: list[dict]) -> None:
    given = sys.argv[1:] if argv is None else argv
    write_results(args.out, "llm_export_size", ("python benchmarks/llm_export_size.py " + " ".join(given)).strip(),
                  rows, NOTES, extra_columns=("scheme", "size_mb", "fp16_mb", "ratio", "target", "max_logit_diff",
                                              "seconds"))


if __name__ == "__main__":
    sys.exit(main())
