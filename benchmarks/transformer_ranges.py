"""Post-LayerNorm channel ranges and post-Softmax probabilities of the zoo DeiT: what RepQ-ViT /
RepQuant's two reparameterizations are for.

Run: ``.venv/bin/python benchmarks/transformer_ranges.py``; writes
benchmarks/results/transformer_ranges.{png,md,json}. Float model, no quantization recipe is run:

(a) per-channel [min, max] of the LayerNorm outputs that feed ``qkv`` (norm1) and ``fc1`` (norm2)
    over the 1024 calibration images, against the one layer-wise range a per-tensor quantizer
    must cover; per block, the ratio of the largest to the median channel range and the 4-bit
    quantization MSE of a layer-wise against a per-channel quantizer (both ranges from RepQ-ViT's
    percentile search, as ``repqvit`` calibrates them);
(b) the distribution of the attention probabilities (all blocks and heads, the first
    ``--prob-images`` calibration images) with the 4-bit log2, log-sqrt2 and uniform grids, and
    each grid's error: MSE of the probabilities, share flushed to zero, and the relative error of
    the attention output ``P @ V`` (V in float), which is what the probabilities feed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

from reparq.data import calibration_subset
from reparq.model.attention_adapters import adapt_attention
from reparq.nn.attention import matmul_quantizers
from reparq.quant.log import LogQuantizer
from reparq.quant.percentile_search import percentile_search_params
from reparq.quant.ranges import params_from_range
from reparq.quant.uniform import int_range
from reparq.recipes.reparam import channel_params
from reparq.report.results import header_lines, results_header
from reparq.zoo import load_model

RESULTS = Path(__file__).parent / "results"
GRIDS = ("uniform_minmax", "uniform_percentile", "log2", "logsqrt2")
GRID_LABELS = {"uniform_minmax": "uniform [0, 1]", "uniform_percentile": "uniform, percentile range",
               "log2": "log2", "logsqrt2": "log-sqrt2"}
COLORS = {"uniform_minmax": "tab:gray", "uniform_percentile": "tab:green", "log2": "tab:blue", "logsqrt2": "tab:red"}


@torch.no_grad()
def norm_outputs(model: nn.Module, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Rows [tokens, C] of every block's norm1 / norm2 output (the inputs of qkv and fc1)."""
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in ("norm1", "norm2")]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen[n].append(out.detach().reshape(-1, out.shape[-1]))) for n in names]
    for x in images.split(batch):
        model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def attention_inputs(model: nn.Module, images: torch.Tensor, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(probabilities [B, H, N, N], v [B, H, N, D]) of every block, from the float model through the
    attention adapters with their quantizers off."""
    adapt_attention(model, 8)
    mqs = [mq for _, mq in matmul_quantizers(model)]
    for mq in mqs:
        mq.set_enabled(False)
    probs: list[list[torch.Tensor]] = [[] for _ in mqs]
    vs: list[list[torch.Tensor]] = [[] for _ in mqs]
    hooks = []
    for i, mq in enumerate(mqs):
        hooks.append(mq.probs.register_forward_pre_hook(lambda m, a, i=i: probs[i].append(a[0].detach())))
        hooks.append(mq.v.register_forward_pre_hook(lambda m, a, i=i: vs[i].append(a[0].detach())))
    for x in images.split(batch):
        model(x)
    for h in hooks:
        h.remove()
    return [(torch.cat(p), torch.cat(v)) for p, v in zip(probs, vs)]


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    qmin, qmax = int_range(bits, symmetric=False)
    if axis is not None:
        scale, zp = scale.reshape(1, -1), zp.reshape(1, -1)
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def grid_quantizers(p: torch.Tensor, bits: int) -> dict:
    """The four probability quantizers at ``bits`` (callables) and their levels (for the plot)."""
    qmax = 2 ** bits - 1
    s_mm, z_mm = params_from_range(torch.tensor(0.0), torch.tensor(1.0), bits, symmetric=False)
    sample = p.flatten()[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
    s_pc, z_pc = percentile_search_params(sample, bits, symmetric=False)  # what probs="uniform" calibrates
    log2, logsqrt2 = LogQuantizer(bits, "log2"), LogQuantizer(bits, "logsqrt2")
    codes = torch.arange(qmax + 1, dtype=torch.float32)
    return {
        "uniform_minmax": (lambda t: fake_quant(t, s_mm, z_mm, bits), ((codes - z_mm) * s_mm).clamp_min(0)),
        "uniform_percentile": (lambda t: fake_quant(t, s_pc.reshape(()), z_pc.reshape(()), bits),
                               ((codes - z_pc.reshape(())) * s_pc.reshape(())).clamp_min(0)),
        "log2": (log2, torch.exp2(-codes)),
        "logsqrt2": (logsqrt2, torch.exp2(-codes / 2)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_fm")
    parser.add_argument("--block", type=int, default=None,
                        help="block drawn in panel (a); default: the one whose norm1 output has the largest "
                             "max/median channel range")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--prob-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    calib = calibration_subset(1024, seed=0)
    model = load_model(args.model).eval()
    bits = args.bits

    # (a) post-LayerNorm channel ranges
    rows = norm_outputs(model, calib)
    range_stats = []
    for name, x in rows.items():
        lo, hi = x.min(dim=0).values, x.max(dim=0).values
        width = hi - lo
        s_t, z_t = percentile_search_params(x, bits, symmetric=False)  # layer-wise (repqvit's per-tensor search)
        s_c, z_c = channel_params(x, bits, "percentile")  # per channel, as repqvit calibrates before the fold
        mse_t = float((fake_quant(x, s_t.reshape(()), z_t.reshape(()), bits) - x).pow(2).mean())
        mse_c = float((fake_quant(x, s_c, z_c, bits, axis=-1) - x).pow(2).mean())
        block, norm = name.split(".")[1], name.split(".")[2]
        range_stats.append({"block": int(block), "norm": norm, "consumer": "qkv" if norm == "norm1" else "fc1",
                            "channels": x.shape[1], "tokens": x.shape[0],
                            "layer_min": round(float(lo.min()), 3), "layer_max": round(float(hi.max()), 3),
                            "max_over_median_range": round(float(width.max() / width.median()), 2),
                            "max_over_min_range": round(float(width.max() / width.min()), 2),
                            "layer_range_over_median_range": round(float((hi.max() - lo.min()) / width.median()), 2),
                            f"mse_layerwise_w{bits}": mse_t, f"mse_per_channel_w{bits}": mse_c,
                            "mse_ratio": round(mse_t / mse_c, 2)})
    block = args.block
    if block is None:
        block = max((s for s in range_stats if s["norm"] == "norm1"), key=lambda s: s["max_over_median_range"])["block"]

    # (b) post-Softmax probabilities
    pairs = attention_inputs(model, calib[:args.prob_images])
    p_all = torch.cat([p.flatten() for p, _ in pairs])
    quantizers = grid_quantizers(p_all, bits)
    prob_stats = []
    for grid, (fq, levels) in quantizers.items():
        sq, n, flushed, out_err, out_ref = 0.0, 0, 0, 0.0, 0.0
        for p, v in pairs:
            ph = fq(p)
            sq += float((ph - p).pow(2).sum())
            n += p.numel()
            flushed += int(((ph == 0) & (p > 0)).sum())
            out_err += float(((ph - p) @ v).pow(2).sum())
            out_ref += float((p @ v).pow(2).sum())
        nonzero = levels[levels > 0]
        prob_stats.append({"grid": grid, "bits": bits, "mse": sq / n, "flushed_to_zero": round(flushed / n, 4),
                           "attn_out_rel_err": round(math.sqrt(out_err / out_ref), 4),
                           "smallest_level": float(nonzero.min()), "levels": sorted({round(float(l), 6) for l in levels})})
    frac_below = {f"below_{t:g}": round(float((p_all < t).float().mean()), 4) for t in (1e-3, 1 / 30, 0.1)}
    p_summary = {"entries": p_all.numel(), "images": args.prob_images, "median": float(p_all.median()),
                 "mean": float(p_all.mean()), **frac_below,
                 "below_logsqrt2_flush": round(float((p_all < 2 ** (-(2 ** bits - 1) / 2 - 0.25)).float().mean()), 4)}

    # figure
    fig = plt.figure(figsize=(14, 10))
    gs = fig.add_gridspec(3, 2, height_ratios=[3, 3, 1], hspace=0.5)
    for j, norm in enumerate(("norm1", "norm2")):
        x = rows[f"blocks.{block}.{norm}"]
        lo, hi = x.min(dim=0).values, x.max(dim=0).values
        s_c, z_c = channel_params(x, bits, "percentile")
        qmin, qmax = int_range(bits, symmetric=False)
        plo, phi = (qmin - z_c) * s_c, (qmax - z_c) * s_c
        idx = torch.arange(x.shape[1])
        ax = fig.add_subplot(gs[0, j])
        ax.vlines(idx, lo, hi, color="tab:blue", alpha=0.35, lw=3, label="channel [min, max]")
        ax.vlines(idx, plo, phi, color="tab:blue", lw=1.2, label=f"per-channel W{bits} range (percentile search)")
        ax.axhline(float(lo.min()), color="tab:red", ls="--", lw=1, label="layer-wise [min, max]")
        ax.axhline(float(hi.max()), color="tab:red", ls="--", lw=1)
        st = next(s for s in range_stats if s["block"] == block and s["norm"] == norm)
        ax.set_title(f"(a) blocks.{block}.{norm} output = input of {st['consumer']}: max/median channel range "
                     f"{st['max_over_median_range']}x,\nW{bits} MSE layer-wise / per-channel {st['mse_ratio']}x",
                     fontsize=9)
        span = float(hi.max() - lo.min())
        ax.set_ylim(float(lo.min()) - 0.35 * span, float(hi.max()) + 0.05 * span)  # room for the legend
        ax.set_xlabel("channel index")
        ax.set_ylabel("activation value")
        ax.legend(fontsize=7, loc="lower right", ncol=2)

    bins = torch.logspace(-7, 0, 71)
    pc = p_all.clamp(1e-7, 1.0)
    counts = torch.histc(torch.log10(pc), bins=70, min=-7, max=0)
    ax_h = fig.add_subplot(gs[1, 0])
    ax_h.stairs((counts / counts.sum()).numpy(), bins.numpy(), fill=True, color="tab:purple", alpha=0.5,
                label=f"attention probabilities ({p_all.numel() / 1e6:.1f} M entries)")
    ax_h.set_xscale("log")
    ax_h.set_yscale("log")
    ax_h.set_ylabel("fraction of entries")
    ax_h.set_title(f"(b) post-Softmax probabilities, all {len(pairs)} blocks and heads; median {p_summary['median']:.2g}"
                   "\n(the first bin holds every p <= 1e-7)", fontsize=9)
    for grid in ("log2", "logsqrt2", "uniform_minmax"):
        nz = quantizers[grid][1]
        nz = nz[nz > 0]
        ax_h.vlines(nz.numpy(), 0, 1, transform=ax_h.get_xaxis_transform(), color=COLORS[grid], lw=0.6, alpha=0.6,
                    label=f"{GRID_LABELS[grid]} {bits}-bit levels")
    ax_h.legend(fontsize=7, loc="upper left")
    ax_g = fig.add_subplot(gs[2, 0], sharex=ax_h)
    for y, grid in enumerate(("uniform_minmax", "uniform_percentile", "log2", "logsqrt2")):
        nz = quantizers[grid][1]
        nz = nz[nz > 0]
        ax_g.plot(nz.numpy(), [y] * nz.numel(), "|", ms=10, mew=2, color=COLORS[grid])
    ax_g.set_yticks(range(4), [f"{GRID_LABELS[g]} {bits}b" for g in ("uniform_minmax", "uniform_percentile", "log2",
                                                                        "logsqrt2")], fontsize=7)
    ax_g.set_ylim(-0.7, 3.7)
    ax_g.set_xlabel("probability (log scale); grid levels, 0 not shown")

    # error contribution per decade of probability
    ax_e = fig.add_subplot(gs[1, 1])
    centers = (bins[:-1] * bins[1:]).sqrt()
    bin_idx = torch.bucketize(pc, bins[1:-1])
    for grid in GRIDS:
        err = torch.cat([(quantizers[grid][0](p) - p).pow(2).flatten() for p, _ in pairs])
        per_bin = torch.zeros(70).index_add_(0, bin_idx, err) / p_all.numel()
        st = next(s for s in prob_stats if s["grid"] == grid)
        ax_e.step(centers.numpy(), per_bin.clamp_min(1e-14).numpy(), where="mid", color=COLORS[grid],
                  label=f"{GRID_LABELS[grid]}: MSE {st['mse']:.2e}, P@V rel. err {st['attn_out_rel_err']:.3f}")
    ax_e.set_xscale("log")
    ax_e.set_yscale("log")
    ax_e.set_ylim(1e-10, None)
    ax_e.set_xlabel("probability (log scale)")
    ax_e.set_ylabel("contribution to the MSE")
    ax_e.set_title(f"(b) where each {bits}-bit grid loses: squared error per probability bin", fontsize=9)
    ax_e.legend(fontsize=7, loc="upper left")
    ax_t = fig.add_subplot(gs[2, 1])
    ax_t.axis("off")
    ax_t.text(0, 0.5, "log2 / log-sqrt2: code q -> 2^-q / 2^-q/2, values below the last level -> 0 (RepQ-ViT);\n"
              "uniform [0, 1]: 15 equal steps; uniform, percentile range: what probs=\"uniform\" calibrates.",
              fontsize=8, va="center")
    fig.suptitle(f"{args.model} (float): post-LayerNorm channel ranges and post-Softmax probabilities, "
                 f"1024 calibration images", fontsize=11)
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "transformer_ranges.png", dpi=100, bbox_inches="tight")

    command = "python benchmarks/transformer_ranges.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = results_header("transformer_ranges", command, code=True)
    payload = {**header, "model": args.model, "block_drawn": block, "postnorm_rows": range_stats,
               "probs_summary": p_summary, "probs_rows": prob_stats}
    (args.out / "transformer_ranges.json").write_text(json.dumps(payload, indent=1) + "\n")
    md = [*header_lines(header),
          f"- model: {args.model} (float), 1024 calibration images (seed 0); panel (a) draws block {block}", "",
          "![ranges](transformer_ranges.png)", "",
          "## Post-LayerNorm activations (inputs of qkv and fc1)", "",
          "range = max - min of a channel over all tokens; MSE: fake-quant error of the norm's output at "
          f"{bits} bits, asymmetric, ranges from RepQ-ViT's percentile search: one layer-wise range against one "
          "range per channel (what `repqvit` / `repquant` calibrate and then fold exactly into the LayerNorm).", "",
          "| block | norm -> consumer | layer [min, max] | max/median ch. range | max/min ch. range | "
          f"layer range / median ch. range | MSE layer-wise W{bits} | MSE per-channel W{bits} | ratio |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {s['block']} | {s['norm']} -> {s['consumer']} | [{s['layer_min']}, {s['layer_max']}] | "
           f"{s['max_over_median_range']} | {s['max_over_min_range']} | {s['layer_range_over_median_range']} | "
           f"{s[f'mse_layerwise_w{bits}']:.4g} | {s[f'mse_per_channel_w{bits}']:.4g} | {s['mse_ratio']} |"
           for s in range_stats]
    md += ["", "## Post-Softmax probabilities", "",
           f"{p_summary['entries']:,} entries ({args.prob_images} images, all blocks and heads); median "
           f"{p_summary['median']:.3g}, mean {p_summary['mean']:.3g}; share below 1e-3: {p_summary['below_0.001']}, "
           f"below 1/30 (half a uniform [0,1] {bits}-bit step): {p_summary['below_0.0333333']}, below 0.1: "
           f"{p_summary['below_0.1']}; below the log-sqrt2 flush threshold: {p_summary['below_logsqrt2_flush']}.", "",
           "MSE: mean squared error of the probabilities; flushed: share of entries (all > 0) quantized to 0; "
           "P@V rel. err: ||(P_hat - P) V|| / ||P V|| over all blocks with float V (what the probabilities feed).", "",
           "| grid | bits | smallest level > 0 | MSE | flushed to 0 | P@V rel. err |", "|---|---|---|---|---|---|"]
    md += [f"| {GRID_LABELS[s['grid']]} | {s['bits']} | {s['smallest_level']:.3g} | {s['mse']:.3g} | "
           f"{s['flushed_to_zero']} | {s['attn_out_rel_err']} |" for s in prob_stats]
    (args.out / "transformer_ranges.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
