"""Check a Hugging Face export against reparq's model: load it with transformers (the
compressed-tensors integration, eager attention, float32), run the same token windows through
both, and compare perplexity and logits.

This is what a user of the export sees: if the two agree, the checkpoint holds reparq's model.
Weight-only exports agree exactly (equal integers, equal dequantized weights); static W8A8
agrees to float rounding; dynamic per-token activations (``activations="dynamic"``) are the
runtime's ranges, not reparq's, and show their own (small) difference here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from reparq.errors import ReparqError


@dataclass
class HFCheck:
    windows: int
    tokens: int
    ppl_reparq: float
    ppl_hf: float
    rel_diff: float  # |ppl_hf - ppl_reparq| / ppl_reparq
    max_abs_logit_diff: float
    logit_scale: float  # max |logit| of reparq's model, for scale
    same_argmax: float  # share of positions where both predict the same next token

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A small plain-text table for the CLI."""
        rows = [("", "reparq (fake-quant)", "transformers (export)"),
                ("perplexity", f"{self.ppl_reparq:.4f}", f"{self.ppl_hf:.4f}"),
                ("relative difference", "", f"{100 * self.rel_diff:.4f} %"),
                ("max |logit difference|", "", f"{self.max_abs_logit_diff:.3g} (logits up to {self.logit_scale:.3g})"),
                ("same next-token argmax", "", f"{100 * self.same_argmax:.2f} %")]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([f"{self.windows} windows, {self.tokens} tokens"] + lines)


def load_export(out_dir: str | Path) -> nn.Module:
    """The export as transformers loads it (eager attention: reparq's own attention is eager)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager").eval()


@torch.no_grad()
def check_export(out_dir: str | Path, reference: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> HFCheck:
    """Compare the export in ``out_dir`` with ``reference`` (reparq's quantized model) on token
    ``windows`` [N, T]."""
    import torch.nn.functional as F

    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ReparqError(f"the check needs token windows [N, T>=2], got {tuple(windows.shape)}")
    hf = load_export(out_dir)
    nll_r = nll_h = 0.0
    max_diff = scale = 0.0
    same = count = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        ref = reference(input_ids=ids).logits.float()
        got = hf(input_ids=ids).logits.float()
        target = ids[:, 1:]
        nll_r += float(F.cross_entropy(ref[:, :-1].transpose(1, 2), target, reduction="sum"))
        nll_h += float(F.cross_entropy(got[:, :-1].transpose(1, 2), target, reduction="sum"))
        max_diff = max(max_diff, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    ppl_r, ppl_h = math.exp(nll_r / tokens), math.exp(nll_h / tokens)
    return HFCheck(int(windows.shape[0]), tokens, ppl_r, ppl_h, abs(ppl_h - ppl_r) / ppl_r, max_diff, scale,
                   same / count)


def directory_size_mb(directory: str | Path, suffix: str = ".safetensors") -> float:
    """Size of the tensor files in a directory (MiB)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.name.endswith(suffix)) / 2 ** 20


__all__ = ["HFCheck", "check_export", "directory_size_mb", "load_export"]
