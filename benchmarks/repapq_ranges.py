"""Per-channel weight and activation ranges of the merged zoo RepVGG, before and after repapq.

Run: ``.venv/bin/python benchmarks/repapq_ranges.py``; writes benchmarks/results/repapq_ranges.{png,md,json}.
"Before" is the merged float model; "after" is the deployed ``repapq`` W4A4 model (channels
equalized across ReLU, QPRep learned and folded: its per-channel weight ranges are ``scale_c * qmax`` and the next layer sees the
activations the folded gains and shifts produce). The plot shows the outliers RepAPQ is for:
each merged 3x3 kernel carries the identity and 1x1 branches in its centre tap, so a channel's
weight range is set by one tap, and post-ReLU activation ranges differ by an order of magnitude
between channels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

import reparq
from reparq.data import calibration_subset
from reparq.recipes.prepare import prepare_for_deployment
from reparq.report.results import header_lines, results_header
from reparq.zoo import load_model

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def channel_input_ranges(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of each named conv over the batch."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].abs().amax(dim=(0, 2, 3)))) for n in names]
    model(batch)
    for h in hooks:
        h.remove()
    return seen


def weight_stats(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: max |w| over the kernel, and max |w| excluding the centre tap."""
    w = conv.weight.detach()
    full = w.abs().amax(dim=(1, 2, 3))
    if w.shape[-1] < 3:
        return full, full
    off = w.clone()
    off[..., w.shape[-2] // 2, w.shape[-1] // 2] = 0
    return full, off.abs().amax(dim=(1, 2, 3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="repvgg_fm")
    parser.add_argument("--layers", nargs="*", default=["stages.0.1.reparam_conv", "stages.1.2.reparam_conv", "stages.2.2.reparam_conv"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calib = calibration_subset(1024, seed=0)
    trained = load_model(args.model)
    merged = load_model(args.model)
    prepare_for_deployment(merged)
    qmodel = reparq.quantize(trained, calib, recipe="repapq", w_bits=4, a_bits=4, seed=0, iters=args.iters)
    batch = calib[:256]
    act_before = channel_input_ranges(merged, args.layers, batch)
    act_after = channel_input_ranges(qmodel, args.layers, batch)
    fig, axes = plt.subplots(2, len(args.layers), figsize=(5 * len(args.layers), 7))
    stats = []
    for j, name in enumerate(args.layers):
        conv = merged.get_submodule(name)
        full, off_centre = weight_stats(conv)
        wq = qmodel.get_submodule(name).weight_quantizer
        after = (wq.scale.detach() * wq.qmax).reshape(-1)
        order = torch.argsort(full, descending=True)
        x = range(full.numel())
        ax = axes[0, j]
        ax.bar(x, full[order], color="tab:blue", alpha=0.6, label="merged float: max |w|")
        ax.plot(x, off_centre[order], "k.", ms=3, label="merged float: max |w| without centre tap")
        ax.plot(x, after[order], "r_", ms=6, label="repapq W4 (equalized, QPRep folded): range")
        ax.set_title(f"{name}\nweight max |w| per output channel", fontsize=9)
        ax.set_xlabel("output channel (sorted)")
        ax.legend(fontsize=7)
        a0, a1 = act_before[name], act_after[name]
        order_a = torch.argsort(a0, descending=True)
        ax = axes[1, j]
        ax.bar(range(a0.numel()), a0[order_a], color="tab:green", alpha=0.6, label="merged float")
        ax.plot(range(a1.numel()), a1[order_a], "r.", ms=4, label="repapq W4A4 model")
        ax.set_yscale("log")
        ax.set_title(f"{name}\ninput activation max |x| per channel", fontsize=9)
        ax.set_xlabel("input channel (sorted by float range)")
        ax.legend(fontsize=7)
        q_full, q_off = weight_stats(qmodel.get_submodule(name))
        stats.append({"layer": name,
                      "weight_centre_share": round(float((full > off_centre * 1.5).float().mean()), 3),
                      "weight_centre_share_repapq": round(float((q_full > q_off * 1.5).float().mean()), 3),
                      "weight_max_over_median_channel": round(float(full.max() / full.median()), 2),
                      "act_max_over_median_channel_float": round(float(a0.max() / a0.median().clamp_min(1e-8)), 2),
                      "act_max_over_median_channel_repapq": round(float(a1.max() / a1.median().clamp_min(1e-8)), 2)})
    fig.suptitle(f"{args.model} merged: per-channel ranges before and after repapq (equalization + QPRep, W4A4, {args.iters} iters)")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "repapq_ranges.png", dpi=100)
    command = "python benchmarks/repapq_ranges.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = results_header("repapq_ranges", command, code=True)
    (args.out / "repapq_ranges.json").write_text(json.dumps({**header, "rows": stats}, indent=1) + "\n")
    md = [*header_lines(header), "",
          "![ranges](repapq_ranges.png)", "",
          "`weight_centre_share`: fraction of output channels whose largest weight is the centre tap by a factor "
          ">1.5 over every other tap (the merged identity/1x1 branches), in the merged float model and in the deployed "
          "repapq model (after channel equalization).", "",
          "| layer | weight_centre_share | centre share (repapq) | weight max/median channel | act max/median (float) "
          "| act max/median (repapq) |",
          "|---|---|---|---|---|---|"]
    md += [f"| {s['layer']} | {s['weight_centre_share']} | {s['weight_centre_share_repapq']} | "
           f"{s['weight_max_over_median_channel']} | "
           f"{s['act_max_over_median_channel_float']} | {s['act_max_over_median_channel_repapq']} |" for s in stats]
    (args.out / "repapq_ranges.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
