"""Deployed int8 speed at real sizes: ImageNet-shape timm convnets and transformers, BERT encoders.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_real.py``; writes
benchmarks/results/latency_real.{md,json}. Speed does not depend on trained weights, so each
architecture is built with random weights (seeded), merged (Rep branches, BN), and calibrated on
a few synthetic batches (224x224 standard-normal images; for the BERT encoders 128-token
sequences: MiniLM on real sentences packed into full windows, the BERT-base-shaped encoder on
random token ids). The convnets' BN statistics are measured on the synthetic batches first.

Per model, in one run: ORT FP32 (the same deployed float graph), reparq's W8A8 export of the
``minmax`` model and of the recommended recipe (``config="w8a8"``, with few iterations: the
deployed graph does not depend on them), and ONNX Runtime's own ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations, MinMax calibration on the same batches, after its
``quant_pre_process``) of the FP32 graph. Timed interleaved (every repeat runs every variant,
rotating order), median of repeats, at batch 1 and 32 and 1 and 2 intra-op threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import reparq  # noqa: E402
from latency import SentenceEncoder, _kernels, _runner, write  # noqa: E402
from reparq.deploy import ort_runner  # noqa: E402
from reparq.deploy.onnx_export import torch_to_onnx  # noqa: E402
from reparq.eval.latency import has_vnni, int8_instructions, time_interleaved  # noqa: E402
from reparq.report.results import source_version  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TIMM_MODELS = ("repvgg_a0", "repvgg_b0", "mobileone_s0", "deit_tiny_patch16_224", "deit_small_patch16_224",
               "swin_tiny_patch4_window7_224")
TEXT_MODELS = ("minilm", "bert_base")
CONVNETS = ("repvgg_a0", "repvgg_b0", "mobileone_s0")
SEQ = 128
COLUMNS = (("model", "model"), ("variant", "int8 graph"), ("batch", "batch"), ("threads", "threads"),
           ("fp_ms", "FP32 ms"), ("int8_ms", "int8 ms"), ("ratio", "int8/FP32"), ("vs_ort", "vs ORT int8"),
           ("target", "target"), ("cosine", "cos vs fake-quant"), ("fp_cosine", "cos vs FP32"),
           ("agreement", "top-1 agr."),
           ("int8_kernels", "int8 kernels"), ("float_ops", "float compute ops"), ("int8_isa", "CPU int8"))


@dataclass
class Case:
    """One architecture: the float model to quantize, how to call it, and what ORT is fed."""

    name: str
    net: nn.Module
    calib: Any  # what reparq.quantize takes
    wrap: Callable[[nn.Module], nn.Module]  # the module exported (a sentence encoder around a BERT)
    example: tuple
    input_names: list[str]
    dynamic_axes: dict | None
    eval_inputs: dict[str, np.ndarray]  # 32 samples, also the timing batch
    classifier: bool


def timm_case(name: str, args) -> Case:
    import timm

    torch.manual_seed(args.seed)
    net = timm.create_model(name, pretrained=False).eval()
    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randn(args.calib, 3, 224, 224, generator=gen)
    evals = torch.randn(32, 3, 224, 224, generator=gen)
    set_batchnorm_statistics(net, calib)
    return Case(name, net, calib, lambda m: m, (torch.zeros(1, 3, 224, 224),), ["input"], None,
                {"input": evals.numpy()}, classifier=True)


def set_batchnorm_statistics(net: nn.Module, images: torch.Tensor) -> None:
    """BN running statistics from the synthetic batches, as a trained network's would be.

    With timm's random init (running var 1) every MobileOne block adds up several unit-gain
    branches, so activations grow by orders of magnitude per block (logits near 1e15 for
    mobileone_s0): the int8 graph's speed is the same, but no recipe's agreement means anything
    there. Statistics measured on the data keep every layer's output near unit scale.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    net.train()
    with torch.no_grad():
        for batch in images.split(8):
            net(batch)
    net.eval()


def packed_windows(tokenizer, sentences: list[str], count: int) -> torch.Tensor:
    """``count`` full SEQ-token windows of sentences joined end to end, each opened by [CLS].

    Block reconstruction replays one batch's attention mask for every sample, so it refuses
    padded batches; packed windows have no padding and still hold real text.
    """
    from reparq.data.text import token_stream, token_windows

    body = token_windows(token_stream(sentences, lambda s: tokenizer.encode(s, add_special_tokens=False),
                                      tokenizer.sep_token_id), SEQ - 1)
    if len(body) < count:
        raise SystemExit(f"only {len(body)} packed windows of {SEQ} tokens from the sentences; need {count}")
    cls = torch.full((count, 1), tokenizer.cls_token_id, dtype=torch.long)
    return torch.cat([cls, body[:count]], dim=1)


def text_case(name: str, args) -> Case:
    from transformers import BertConfig, BertModel

    gen = torch.Generator().manual_seed(args.seed)
    if name == "minilm":
        from reparq.data.text import load_sentences
        from reparq.zoo.minilm import load_minilm

        tokenizer, bert = load_minilm()
        ids = packed_windows(tokenizer, load_sentences(limit=20 * (args.calib + 32)), args.calib + 32)
        mask = torch.ones_like(ids)
    else:
        torch.manual_seed(args.seed)
        bert = BertModel(BertConfig(attn_implementation="eager"), add_pooling_layer=False).eval()
        ids = torch.randint(1000, bert.config.vocab_size, (args.calib + 32, SEQ), generator=gen)
        mask = torch.ones_like(ids)
    names = ["input_ids", "attention_mask"]
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
               "output": {0: "batch"}}
    calib = {"input_ids": ids[:args.calib], "attention_mask": mask[:args.calib]}
    evals = {"input_ids": ids[args.calib:].numpy(), "attention_mask": mask[args.calib:].numpy()}
    return Case(f"{name} (seq {SEQ})", bert, calib, lambda m: SentenceEncoder(m).eval(),
                (ids[:1], mask[:1]), names, dynamic, evals, classifier=False)


def float_graph(case: Case) -> nn.Module:
    from reparq.recipes.prepare import prepare_for_deployment

    fp = copy.deepcopy(case.net).eval()
    prepare_for_deployment(fp)
    for module in fp.modules():  # the explicit softmax(q k^T) v path, as in the quantized model
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return case.wrap(fp)


def ort_quantize_static(fp_path: Path, case: Case, work: Path) -> tuple[Path, float, dict]:
    """ONNX Runtime's own int8 graph, made the way its documentation tells a user to (the peers
    benchmark's adapter: ``quant_pre_process``, QDQ, per-channel, MinMax, run inside ``work``)."""
    from reparq.eval.peers import CalibrationFeed, OnnxSpec, quantize_ort

    if isinstance(case.calib, torch.Tensor):
        feed = CalibrationFeed.from_tensor(case.calib, batch_size=8)
    else:
        feed = CalibrationFeed([tuple(case.calib[k][i:i + 8] for k in case.input_names)
                                for i in range(0, len(case.calib["input_ids"]), 8)])
    peer = quantize_ort(fp_path, feed, "ort-minmax", work, OnnxSpec(case.input_names))
    return peer.onnx_path, peer.calib_seconds, peer.settings


def _outputs(session, feed: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(None, feed)[0]


def _check(ref: np.ndarray, got: np.ndarray, classifier: bool) -> dict:
    """Agreement of the ORT int8 graph with the PyTorch fake-quant model on the 32 held-out samples."""
    a, b = torch.from_numpy(ref).flatten(1), torch.from_numpy(got).flatten(1)
    out = {"cosine": round(float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()), 5),
           "max_diff": round(float((a - b).abs().max() / a.abs().max()), 4)}
    if classifier:  # random weights: near-tied logits, so top-1 agreement is a weak signal here
        out["agreement"] = round(100.0 * float((a.argmax(1) == b.argmax(1)).float().mean()), 1)
    return out


def model_rows(case: Case, args, work: Path) -> list[dict]:
    tag = case.name.split(" ")[0]
    fp_path = torch_to_onnx(float_graph(case), work / f"{tag}_fp32.onnx", case.example, case.input_names,
                            ["output"], case.dynamic_axes)
    variants: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    quantized: dict[str, tuple[nn.Module, float]] = {}
    recipes = [("minmax", {"recipe": "minmax"}), ("recommended", {"config": "w8a8", "iters": args.iters})]
    # (variant key, model, export runtime): both recipes as deployed on ORT, and minmax's portable QDQ graph.
    exports = [("minmax", "minmax", "onnxruntime"), ("recommended", "recommended", "onnxruntime"),
               ("minmax-any", "minmax", "any")]
    if tag in TEXT_MODELS:  # post-LN: the recommended recipe with per-channel grids on the norm outputs only
        recipes.append(("recommended-norms", {"config": "w8a8", "iters": args.iters, "consumer_fold": "norms"}))
        exports.append(("recommended-norms", "recommended-norms", "onnxruntime"))
    if not has_vnni():  # ORT's reduce_range trade made in reparq: 7-bit weights stay int8 without saturating
        recipes.append(("minmax-w7", {"recipe": "minmax", "w_bits": 7}))
        exports.append(("minmax-w7", "minmax-w7", "onnxruntime"))
    fp_ref = _outputs(ort_runner.make_session(fp_path, threads=1), case.eval_inputs)
    for method, kwargs in recipes:
        t0 = time.perf_counter()
        qmodel = reparq.quantize(case.net, case.calib, batch_size=8, seed=args.seed, **kwargs)
        quantized[method] = (qmodel, time.perf_counter() - t0)
    for key, method, runtime in exports:
        qmodel, seconds = quantized[method]
        recipe = qmodel.reparq_info.recipe
        q_enc = case.wrap(qmodel)
        paths[key] = reparq.export_onnx(q_enc, work / f"{tag}_{key}.onnx", case.example,
                                        input_names=case.input_names, output_names=["output"],
                                        dynamic_axes=case.dynamic_axes, runtime=runtime)
        with torch.no_grad():
            args_t = [torch.from_numpy(case.eval_inputs[k]) for k in case.input_names]
            ref = q_enc(*args_t).numpy()
        got = _outputs(ort_runner.make_session(paths[key], threads=1), case.eval_inputs)
        ints, floats = _kernels(ort_runner.optimized_op_counts(paths[key]))
        label = f"reparq {recipe}" + {"recommended": " (recommended)",
                                      "recommended-norms": " (recommended, consumer_fold=norms)",
                                      "minmax-w7": ", w_bits=7 (ORT's reduce_range trade)"}.get(method, "")
        variants[key] = {"variant": label + (", portable QDQ (runtime=any)" if runtime == "any" else ""),
                         "recipe": recipe, "runtime": runtime, "calib_seconds": round(seconds, 1),
                         "w_bits": int(qmodel.reparq_info.config.get("w_bits", 8)),
                         "int8_kernels": ints, "float_ops": floats, **_check(ref, got, case.classifier),
                         **{f"fp_{k}": v for k, v in _check(fp_ref, got, case.classifier).items()}}
        print(case.name, variants[key], flush=True)
    paths["ort"], ort_seconds, ort_settings = ort_quantize_static(fp_path, case, work)
    ints, floats = _kernels(ort_runner.optimized_op_counts(paths["ort"]))
    got = _outputs(ort_runner.make_session(paths["ort"], threads=1), case.eval_inputs)
    reduced = ", reduce_range (7-bit weights)" if ort_settings.get("reduce_range") else ""
    variants["ort"] = {"variant": f"ORT quantize_static (QDQ, per-channel, MinMax{reduced})", "recipe": "ort-minmax",
                       "calib_seconds": round(ort_seconds, 1), "settings": ort_settings, "int8_kernels": ints,
                       "float_ops": floats,
                       **{f"fp_{k}": v for k, v in _check(fp_ref, got, case.classifier).items()}}
    target = 0.40 if tag in CONVNETS or tag in TEXT_MODELS else 0.55
    rows = []
    if args.quiet_flag:  # tell cooperating jobs on this shared machine that timing starts
        args.quiet_flag.touch()
    try:
        _time_variants(case, args, fp_path, paths, variants, target, rows)
    finally:
        if args.quiet_flag:
            args.quiet_flag.unlink(missing_ok=True)
    return rows


def _time_variants(case: Case, args, fp_path: Path, paths: dict, variants: dict, target: float,
                   rows: list[dict]) -> None:
    for threads in args.threads:
        sessions = {"fp": ort_runner.make_session(fp_path, threads=threads)}
        sessions.update({m: ort_runner.make_session(p, threads=threads) for m, p in paths.items()})
        for batch in args.batches:
            feed = {k: v[:batch] for k, v in case.eval_inputs.items()}
            runs = {m: _runner(s, feed) for m, s in sessions.items()}
            t0 = time.perf_counter()
            runs["fp"]()
            single = time.perf_counter() - t0
            inner = max(1, min(20, int(0.2 / max(single, 1e-4))))
            repeats = args.repeats if batch == 1 else args.big_repeats
            ms = time_interleaved(runs, repeats, inner, warmup=1)
            for method, info in variants.items():
                rows.append({"model": case.name, "method": info["recipe"], "w_bits": info.get("w_bits", 8), "a_bits": 8,
                             "seed": args.seed, "calib_samples": args.calib, **info, "batch": batch, "threads": threads,
                             "fp_ms": round(ms["fp"], 2), "int8_ms": round(ms[method], 2),
                             "ratio": round(ms[method] / ms["fp"], 3),
                             "vs_ort": round(ms[method] / ms["ort"], 3), "repeats": repeats, "inner": inner,
                             "target": f"<={target:.2f}" if batch == 32 and method != "ort" else "",
                             "int8_isa": int8_instructions()})
                print({k: rows[-1][k] for k in ("model", "variant", "batch", "threads", "fp_ms", "int8_ms",
                                                  "ratio", "vs_ort")}, flush=True)


NOTES = """\
Random weights (seed {seed}), merged and BN-folded; calibration: `calib_samples` synthetic samples (224x224
standard-normal images, BN statistics measured on them; 128-token sequences without padding, MiniLM on
real sentences packed end to end, BERT-base on random ids). ORT
CPU execution provider, all graph optimizations, OMP_NUM_THREADS=1, `threads` = intra_op_num_threads,
on a shared 2-core machine: absolute times are noise, ratios of variants timed in the same run
(interleaved, median of {repeats} repeats at batch 1, {big} at batch 32) are what to read. FP32 = the
same deployed graph exported in float (timm attention on its explicit path, as in the quantized model).
`int8/FP32` = int8_ms / fp_ms; `vs ORT int8` = int8_ms / (ORT quantize_static's graph's ms) in the same
run (target <=1.05). `reparq ... (recommended)`: `config="w8a8"` (the family-free preset) with
`iters={iters}`: its exported graph has the same operators as minmax's (except where a post-norm
encoder keeps per-channel input affines: repquant on MiniLM and BERT-base). reparq's exports: `runtime="onnxruntime"` (ORT's MatMulIntegerToFloat
with each Linear's bias inside) unless the row says `runtime=any` (standard operators only; for the
convnets the two differ only in the classifier's bias). `cos vs fake-quant`: mean cosine
of ORT int8 outputs and the PyTorch fake-quant model's on 32 held-out samples (for ORT's graph: vs FP32);
`top-1 agr.` on those (random weights: near-tied logits, a weak signal; the trained zoo models'
agreement is in latency.md). `int8 kernels`/`float compute ops`: the optimized ORT graph's operators.
`CPU int8`: the best int8 dot-product instructions this CPU has (read from /proc/cpuinfo)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[*TIMM_MODELS, *TEXT_MODELS])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7, help="repeats at batch 1")
    parser.add_argument("--big-repeats", type=int, default=5, help="repeats at batch 32 (seconds per call)")
    parser.add_argument("--calib", type=int, default=32, help="synthetic calibration samples")
    parser.add_argument("--iters", type=int, default=2, help="reconstruction iterations of the recommended recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="latency_real",
                        help="results file stem: one per CPU kind (e.g. latency_real_avx2 for a CPU without VNNI/AMX)")
    parser.add_argument("--quiet-flag", type=Path, default=None,
                        help="a file that exists only while timing, for jobs sharing the machine to wait on")
    args = parser.parse_args(argv)
    unknown = set(args.models) - {*TIMM_MODELS, *TEXT_MODELS}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {[*TIMM_MODELS, *TEXT_MODELS]}")
    torch.set_num_threads(1)
    given = sys.argv[1:] if argv is None else argv
    command = ("OMP_NUM_THREADS=1 python benchmarks/latency_real.py " + " ".join(given)).strip()
    previous = args.out / f"{args.name}.json"
    old = json.loads(previous.read_text()) if previous.exists() else {"rows": [], "command": ""}
    code = source_version()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            case = text_case(name, args) if name in TEXT_MODELS else timm_case(name, args)
            rows += [{**r, "code": code} for r in model_rows(case, args, Path(tmp))]
            done = {r["model"] for r in rows}  # models measured now replace their old rows
            kept = [r for r in old["rows"] if r["model"] not in done]
            order = [*TIMM_MODELS, *TEXT_MODELS]
            merged = sorted(kept + rows, key=lambda r: (order.index(r["model"].split(" ")[0]), r["threads"],
                                                        r["batch"]))
            history = "; ".join(c for c in dict.fromkeys([*old["command"].split("; "), command]) if c)
            write(args.out, history, merged, NOTES.format(seed=args.seed, repeats=args.repeats,
                                                          big=args.big_repeats, iters=args.iters),
                  name=args.name, columns=COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
