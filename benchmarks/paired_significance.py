"""Is any recipe significantly ahead of ours (``repquant``, ``repapq``), or behind it? A paired test per cell.

Run: ``.venv/bin/python benchmarks/paired_significance.py`` (about two minutes on 2 cores:
it re-measures nothing, and evaluates only the float zoo models, for the flips); writes
benchmarks/results/paired_significance.{md,json}. The ablations the same way:
``paired_significance.py --sources repquant_ablation repapq_ablation --name ablation_paired``, where
the rivals are the variants, each one change to the reference's defaults; and the peer tools
(NNCF, ONNX Runtime, INC) with ``--sources peers --name peers_paired``.

A mean over seeds that differs by 0.05 points is five of 10k test images (and a perplexity gap
of 0.01 on llama_fm is a five-thousandth of the spread of one held-out window's mean NLL), so the
question the means cannot answer is whether such a gap is more than the test set's noise. The
benchmarks keep each row's per-item scores (``results/per_item/``: per-image right/wrong for the
zoo, per-window mean NLL for llama_fm, per-sentence cosine for MiniLM), so every committed row can
be compared item by item with the reference's row of the same cell and seed, with no second run.
The reference (column ``reference``) is the project's recipe for the model's kind: ``repquant``
on the transformers, ``repapq`` on the Rep CNNs (:data:`REFERENCES`, the first with rows).

Per cell and rival, over the seeds both have per-item scores for, each test item gets
``d = score(reference) - score(rival)`` summed over the seeds (score: images right; minus the
window's NLL; the sentence's cosine). Items are independent draws and seeds are not, so the tests
are over items: ``p_sign``, the exact two-sided sign test on the items with ``d != 0``
(for images, McNemar's exact test pooled over seeds without counting one image twice), with
``rival_ahead`` / ``ref_ahead`` the items each side wins; and ``p_mean``, a seeded
sign-flip randomization test of the mean of ``d`` (the question a mean metric such as perplexity
asks; :mod:`reparq.eval.significance`). ``rival_lead``: the rival's mean lead over the reference
per seed in the metric's units (top-1 points, perplexity, cosine; positive: the rival is
better), and ``lead_high`` the upper end of its 95% interval over items: the largest lead the test
set still allows, so "the reference is at least as good" holds to within that margin. ``flips`` /
``ref_flips`` (zoo only): test images whose right/wrong differs from the float model's, mean
per seed, with ``p_flips`` the sign-flip test of the mean difference in flips. ``same_code``:
whether every compared row was measured by one library source.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from reparq.eval.significance import decode_hits, mean_difference_interval, paired_sign_test, sign_flip_p
from reparq.report.results import load_per_item, row_key, write_results

RESULTS = Path(__file__).parent / "results"
# Our recipe per kind of model, in the order looked for: the first one with rows for a model is its reference.
REFERENCES = ("repquant", "repapq")
RIVALS = ("minmax", "percentile", "mse", "mae", "adaround", "brecq", "qdrop", "repqvit")


def _hits_score(entry: dict) -> torch.Tensor:
    return decode_hits(entry["hits"], entry["images"]).double()


# benchmark -> (metric of its rows, how a per-item entry becomes a score where higher is better)
SOURCES = {
    "ptq_baselines": ("top1", _hits_score),
    "transformers_real": (None, lambda e: -torch.tensor(e["nll"], dtype=torch.float64) if "nll" in e
                          else torch.tensor(e["cosine"], dtype=torch.float64)),
    # The ablations: each variant of our recipe against the recipe at its defaults.
    "repquant_ablation": ("top1", _hits_score),
    "repapq_ablation": ("top1", _hits_score),
    # The peer tools (benchmarks/peers.py): each peer's row against reparq's recommended preset's.
    "peers": (None, lambda e: _hits_score(e) if "hits" in e else -torch.tensor(e["nll"], dtype=torch.float64)
              if "nll" in e else torch.tensor(e["cosine"], dtype=torch.float64)),
}
# The baseline comparison: what runs without --sources.
DEFAULT_SOURCES = ("ptq_baselines", "transformers_real")
TEXT_METRIC = {"llama_fm": "perplexity", "opt_fm": "perplexity", "minilm": "cosine"}


def lead_in_metric(gap: float, metric: str, reference: float) -> float:
    """A rival's lead over the reference in the metric's own units, from ``gap``, the mean per-item score
    difference per seed (rival minus reference; the score being an image's hit, minus a window's
    NLL, a sentence's cosine). Positive: the rival is better. ``reference``: the reference's mean
    metric, which a perplexity lead scales with (the rival's perplexity is ``reference * exp(-gap)``)."""
    if metric == "top1":
        return 100.0 * gap
    if metric == "perplexity":
        return reference * (1.0 - math.exp(-gap))
    return gap


def compare(rows: list[dict], items: dict[str, dict], score, model: str, bits: tuple[int, int], rival: str,
            metric: str, fp_score: torch.Tensor | None = None, reference: str = "repquant") -> dict | None:
    """The paired row of ``rival`` against ``reference`` in one cell, or None without common per-item seeds.

    ``fp_score``: the float model's per-item score (its hits), for the flips: items whose score
    differs from the float model's, per seed (fidelity to the float model, which top-1 nets out:
    a recipe can match FP's top-1 while getting different images right)."""
    def cell(method: str) -> dict[int, dict]:
        return {r["seed"]: r for r in rows if r["model"] == model and r["method"] == method
                and (r["w_bits"], r["a_bits"]) == bits and r["metric"] == metric and row_key(r) in items}

    ours, theirs = cell(reference), cell(rival)
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None

    def per_seed(cell_rows: dict[int, dict]) -> list[torch.Tensor]:
        return [score(items[row_key(cell_rows[s])]) for s in seeds]

    ours_scores, theirs_scores = per_seed(ours), per_seed(theirs)
    a, b = sum(ours_scores), sum(theirs_scores)
    sign = paired_sign_test(a, b)
    gap, _, gap_high = mean_difference_interval(b / len(seeds), a / len(seeds))
    ref_metric = statistics.mean(ours[s]["quant"] for s in seeds)
    compared = [ours[s] for s in seeds] + [theirs[s] for s in seeds]
    codes = {items[row_key(r)].get("code") for r in compared}
    theirs_rows = [theirs[s] for s in seeds]
    return {"model": model, "method": rival, "reference": reference, "w_bits": bits[0], "a_bits": bits[1],
            "metric": metric, "fp": theirs_rows[0]["fp"],
            "quant": round(statistics.mean(r["quant"] for r in theirs_rows), 3),
            "delta": round(statistics.mean(r["delta"] for r in theirs_rows), 3),
            "ref_delta": round(statistics.mean(ours[s]["delta"] for s in seeds), 3),
            "rival_ahead": sign.b_ahead, "ref_ahead": sign.a_ahead, "p_sign": float(f"{sign.p_value:.4g}"),
            "p_mean": round(sign_flip_p(a, b), 5),
            "rival_lead": round(lead_in_metric(gap, metric, ref_metric), 4),
            "lead_high": round(lead_in_metric(gap_high, metric, ref_metric), 4),
            **flips_columns(ours_scores, theirs_scores, fp_score), "same_code": len(codes) == 1 and None not in codes,
            "calib_seconds": round(statistics.mean(r["calib_seconds"] for r in theirs_rows), 2),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in theirs_rows), "seed": None, "seeds": seeds}


def flips_columns(ours: list[torch.Tensor], theirs: list[torch.Tensor], fp_score: torch.Tensor | None) -> dict:
    """Mean flips per seed of the reference and the rival against the float model, and the sign-flip
    test's p of the mean difference in flips per item (pooled over seeds; not the sign test: an
    image one recipe flips on every seed and the other on none weighs more than one flipped once);
    None without the float model's scores."""
    if fp_score is None:
        return {"flips": None, "ref_flips": None, "p_flips": None}
    ours_flips = sum((s != fp_score).double() for s in ours)
    theirs_flips = sum((s != fp_score).double() for s in theirs)
    return {"flips": round(float(theirs_flips.sum()) / len(theirs), 1),
            "ref_flips": round(float(ours_flips.sum()) / len(ours), 1),
            "p_flips": round(sign_flip_p(-ours_flips, -theirs_flips), 5)}


def flips_summary(rows: list[dict]) -> str:
    """Per cell with the float model's hits: the reference's flips, the rival with the fewest, and
    where the reference ranks."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("flips") is not None:
            cells.setdefault((r["model"], r["w_bits"], r["a_bits"]), []).append(r)
    if not cells:
        return ""
    lines = ["## Fidelity to the float model: flips", "",
             "Test images whose right/wrong differs from the float model's, mean per seed (lower: closer to "
             "FP; top-1 counts the two directions against each other, flips add them). p_flips: sign-flip "
             "test of the mean difference in flips per image, pooled over the seeds compared.", "",
             "| model | W/A | reference | its flips | rival with the fewest | rival's flips | p_flips | "
             "reference's rank |", "|---|---|---|---|---|---|---|---|"]
    for (m, w, a), rs in cells.items():
        best = min(rs, key=lambda r: r["flips"])
        rank = 1 + sum(r["flips"] < r["ref_flips"] for r in rs)  # each against the reference on its own seeds
        lines.append(f"| {m} | W{w}A{a} | {best['reference']} | {best['ref_flips']:.1f} | {best['method']} | "
                     f"{best['flips']:.1f} | {best['p_flips']:g} | {rank} of {len(rs) + 1} |")
    return "\n".join(lines)


def float_hits(model: str, rows: list[dict]) -> torch.Tensor:
    """The float zoo model's per-image hits on the test split, checked against the rows' FP top-1
    (the same checkpoint measured them)."""
    from reparq.data import load_fashion_mnist
    from reparq.eval.accuracy import correct_predictions
    from reparq.zoo import load_model

    images, labels = load_fashion_mnist("test")
    hits = correct_predictions(load_model(model), images, labels)
    fp = {r["fp"] for r in rows if r["model"] == model}
    if fp != {round(100.0 * float(hits.double().mean()), 2)}:
        raise SystemExit(f"{model}: the float model's top-1 is not the rows' FP {sorted(fp)}: another checkpoint")
    return hits.double()


def rival_ahead_summary(rows: list[dict]) -> str:
    """The cells where a rival's mean is better than the reference's, with both tests' p."""
    def better(r: dict) -> bool:  # perplexity: lower is better
        return r["delta"] < r["ref_delta"] if r["metric"] == "perplexity" else r["delta"] > r["ref_delta"]

    ahead = [r for r in rows if better(r)]
    lines = ["## Cells where a rival's mean is better than the reference's", ""]
    if not ahead:
        return "\n".join(lines + ["None: the reference's mean is at least every rival's in every cell compared."])
    lines += ["| model | W/A | reference | rival | rival Δ | reference Δ | items rival / reference ahead | p_sign | "
              "p_mean |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | W{r['w_bits']}A{r['a_bits']} | {r['reference']} | {r['method']} | {r['delta']:+g} | "
              f"{r['ref_delta']:+g} | {r['rival_ahead']} / {r['ref_ahead']} | {r['p_sign']:g} | "
              f"{r['p_mean']:g} |" for r in ahead]
    low = min(min(r["p_sign"], r["p_mean"]) for r in ahead)
    return "\n".join(lines + ["", f"Smallest p among them: {low:g} (over {len(ahead)} comparisons, before any "
                                   "correction for testing many)."])


def margin_summary(rows: list[dict]) -> str:
    """Per cell, the largest lead over the reference that the test items still allow any rival (the
    upper end of its 95% interval): the margin within which "the reference is at least as good" holds."""
    units = {"top1": "top-1 points"}  # perplexity and cosine are their own units
    lines = ["## How far a rival could still be ahead (non-inferiority margin)", "",
             "Per cell, the rival whose 95% interval of the lead over the reference reaches furthest (lead: rival "
             "better by, in the metric's units; mean per seed over the seeds compared).", "",
             "| model | W/A | units | reference | rival | mean lead | 95% upper bound |",
             "|---|---|---|---|---|---|---|"]
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["w_bits"], r["a_bits"])
        if key not in cells or r["lead_high"] > cells[key]["lead_high"]:
            cells[key] = r
    lines += [f"| {m} | W{w}A{a} | {units.get(r['metric'], r['metric'])} | {r['reference']} | {r['method']} | "
              f"{r['rival_lead']:+.4g} | {r['lead_high']:+.4g} |" for (m, w, a), r in cells.items()]
    return "\n".join(lines)


def rivals_in(rows: list[dict], model: str, source: str, reference: str | None = None) -> list[str]:
    """The recipes paired with the reference by default: the baselines (:data:`RIVALS`) in the baseline
    benchmarks, and in an ablation every variant of the reference it has rows for, in file order."""
    if source in DEFAULT_SOURCES:
        return list(RIVALS)
    reference = reference or reference_for(rows, model)
    return [m for m in dict.fromkeys(r["method"] for r in rows if r["model"] == model) if m != reference]


def reference_for(rows: list[dict], model: str) -> str | None:
    """The first of :data:`REFERENCES` with rows for ``model``: the recipe its rivals are paired with."""
    return next((m for m in REFERENCES if any(r["model"] == model and r["method"] == m for r in rows)), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["deit_fm", "swin_fm", "llama_fm", "opt_fm", "minilm",
                                                        "repvgg_fm", "repvgg_deep_fm", "mobileone_fm"])
    parser.add_argument("--recipes", nargs="*", default=None,
                        help=f"rivals compared with the reference (default: {', '.join(RIVALS)}; for an ablation, "
                             "every variant in it)")
    parser.add_argument("--sources", nargs="*", default=list(DEFAULT_SOURCES), choices=list(SOURCES),
                        help="the benchmarks whose rows are paired")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the benchmarks' results are")
    parser.add_argument("--references", nargs="*", default=None,
                        help="pair the rivals with each of these methods in turn, where a model has rows of it "
                             f"(default: the first of {', '.join(REFERENCES)}); e.g. reparq's grouped W4A16 rows")
    parser.add_argument("--name", default="paired_significance")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out_rows: list[dict] = []
    for source in args.sources:
        metric, score = SOURCES[source]
        path = args.results / f"{source}.json"
        if not path.exists():
            continue
        rows, items = json.loads(path.read_text())["rows"], load_per_item(args.results, source)
        for model in args.models:
            model_metric = metric or TEXT_METRIC.get(model, "top1")  # a source of zoo and text rows (peers)
            for reference in args.references or [reference_for(rows, model)]:
                cells = sorted({(r["w_bits"], r["a_bits"]) for r in rows if r["model"] == model
                                and r["method"] == reference}, reverse=True)
                fp_score = float_hits(model, rows) if model_metric == "top1" and cells else None
                rivals = args.recipes or rivals_in(rows, model, source, reference)
                for bits in cells:
                    for rival in rivals:
                        row = compare(rows, items, score, model, bits, rival, model_metric, fp_score, reference)
                        if row is not None:
                            out_rows.append(row)
                            print(row, flush=True)
    if not out_rows:
        raise SystemExit(f"no per-item scores of {', '.join(args.sources)} under {args.results / 'per_item'}: "
                         "run those benchmarks first")
    command = ("python benchmarks/paired_significance.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    notes = __doc__.split("\n\n", 1)[1].strip() + (
        "\n\n`delta` is the rival's mean over the seeds, `ref_delta` the reference's (top-1 points, perplexity, "
        "cosine); calib_seconds / peak_mem_mb are the rival's mean / max.")
    sections = (rival_ahead_summary(out_rows), margin_summary(out_rows), flips_summary(out_rows))
    write_results(args.out, args.name, command, out_rows, notes, "\n\n".join(filter(None, sections)),
                  extra_columns=("reference", "ref_delta", "rival_ahead", "ref_ahead", "p_sign", "p_mean", "rival_lead",
                                 "lead_high", "flips", "ref_flips", "p_flips", "same_code"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
