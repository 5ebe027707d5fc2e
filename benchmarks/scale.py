"""Streamed calibration at scale: peak memory and time vs depth, a 1.1B-parameter model under
3 GB, and data-parallel throughput (issue 9).

Run: ``.venv/bin/python benchmarks/scale.py`` (all parts; ``--parts depth big dp`` to choose);
writes benchmarks/results/scale.{md,json}. Every measured run is its own fresh process (peak
RSS = the process's ``VmHWM``, imports included), with one torch thread unless noted.

- depth: LLaMA-architecture configs of one width (hidden 512, MLP 1408, 8 heads, vocab 4096) at
  4, 8, 16 and 32 layers, random weights written as sharded safetensors; ``repqvit`` streamed
  (rows ``mode=streamed``) and, for contrast, the whole model loaded and calibrated in memory
  (``mode=in_memory``).
- big: TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers, 32 heads / 4 KV heads, vocab
  32000; 1.10 B parameters) with random fp16 weights written shard by shard (never whole in
  memory), calibrated streamed with ``repqvit`` and with a short ``repquant`` (4 + 4 steps per
  layer). Random weights: this measures memory and time, not accuracy.
- dp: the 4-layer config with ``repquant`` (10 + 5 steps per layer, 32 windows of 128 tokens) in
  1 process and in 2 gloo processes (one thread each); ``samples_per_s`` = calibration samples /
  wall seconds of the slowest process.
- gpu (on a machine with a CUDA device; its own results file, ``scale_gpu``, since it is another
  machine): the dp config with ``repquant`` on the CPU (every core) and with ``--device cuda``
  in one run (``speedup`` = CPU seconds / GPU seconds), then the 1.1B model streamed on the GPU
  with ``repqvit`` and the short ``repquant``; rows add the GPU's peak allocated memory
  (``gpu_peak_mb``). Each row is also appended to ``<out>/scale_gpu.rows.jsonl`` as soon as it is
  measured, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WIDTH = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, vocab_size=32000)


def write_random_model(directory: Path, dtype: str = "float32", seed: int = 0, **cfg) -> int:
    """A LLaMA config + random weights as ~500 MB shards, generated tensor by tensor; returns
    the parameter count."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from reparq.stream import write_sharded

    config = LlamaConfig(max_position_embeddings=256, tie_word_embeddings=False, **cfg)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = [(n, tuple(p.shape)) for n, p in skeleton.state_dict().items()]
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def tensors():
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                yield name, (1 + 0.1 * torch.randn(shape, generator=gen)).to(dt)
            else:
                yield name, (0.02 * torch.randn(shape, generator=gen)).to(dt)

    directory.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors(), directory, max_shard_mb=500)
    config.save_pretrained(directory)
    return sum(int(torch.Size(s).numel()) for _, s in shapes)


def worker(spec: dict) -> dict:
    """One measured run (in its own process)."""
    import torch

    torch.manual_seed(0)
    device = spec.get("device", "cpu")
    ids = torch.randint(0, spec["vocab"], (spec["samples"], spec["seq_len"]), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    if spec["mode"] == "in_memory":
        from transformers import LlamaForCausalLM

        import reparq
        from reparq.model.hf_adapters import register_hf_attention

        register_hf_attention()
        model = LlamaForCausalLM.from_pretrained(spec["model_dir"], attn_implementation="eager").eval()
        model.config.use_cache = False
        reparq.quantize(model, {"input_ids": ids}, recipe=spec["recipe"], w_bits=8, a_bits=8,
                        batch_size=spec["batch_size"], **spec["options"])
    else:
        from reparq.parallel import data_parallel
        from reparq.stream import quantize_streamed

        with data_parallel():
            quantize_streamed(spec["model_dir"], ids, spec["out_dir"], recipe=spec["recipe"], w_bits=spec["w_bits"],
                              a_bits=spec["a_bits"], batch_size=spec["batch_size"], restart=True, device=device,
                              **spec["options"])
    result = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": peak_rss_mb()}
    if device.startswith("cuda"):
        result["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec. Not ``ru_maxrss``: Linux
    carries into it the RSS of the parent the worker was forked from (here, the process that
    wrote the model), which would grow with the model written, not with the calibration."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(spec: dict, nproc: int = 1) -> dict:
    threads = str(spec.get("threads", 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if nproc == 1:
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29533",
               __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
    results = [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    merged = {"seconds": max(r["seconds"] for r in results), "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
    if any("gpu_peak_mb" in r for r in results):
        merged["gpu_peak_mb"] = max(r.get("gpu_peak_mb", 0.0) for r in results)
    return merged


DP_SPEC = dict(recipe="repquant", w_bits=4, a_bits=8, samples=32, seq_len=128, batch_size=4,
               vocab=WIDTH["vocab_size"], options={"iters": 10, "clip_iters": 5})
BIG_RECIPES = (("repqvit", {}), ("repquant", {"iters": 4, "clip_iters": 4, "recon_batch_size": 2}))


def big_spec(model_dir: Path, tmp: Path, recipe: str, options: dict, **extra) -> dict:
    return dict(mode="streamed", model_dir=str(model_dir), out_dir=str(tmp / f"big-{recipe}"), recipe=recipe, w_bits=4,
                a_bits=8, samples=8, seq_len=64, batch_size=4, vocab=BIG["vocab_size"], options=options, **extra)


def depth_rows(tmp: Path) -> list[dict]:
    rows = []
    for layers in (4, 8, 16, 32):
        model_dir = tmp / f"d{layers}"
        params = write_random_model(model_dir, num_hidden_layers=layers, **WIDTH)
        for mode in ("streamed", "in_memory"):
            spec = dict(mode=mode, model_dir=str(model_dir), out_dir=str(tmp / f"o{layers}"), recipe="repqvit",
                        w_bits=8, a_bits=8, samples=16, seq_len=128, batch_size=8, vocab=WIDTH["vocab_size"], options={})
            m = measure(spec)
            row = {"part": "depth", "model": f"llama-w512-L{layers}", "mode": mode, "method": "repqvit", "w_bits": 8,
                   "a_bits": 8, "layers": layers, "params": params, "processes": 1, "calib_seconds": m["seconds"],
                   "peak_mem_mb": m["peak_rss_mb"]}
            print(row, flush=True)
            rows.append(row)
    return rows


def big_rows(tmp: Path) -> list[dict]:
    model_dir = tmp / "big"
    params = write_random_model(model_dir, dtype="float16", **BIG)
    rows = []
    for recipe, options in BIG_RECIPES:
        m = measure(big_spec(model_dir, tmp, recipe, options))
        row = {"part": "big", "model": "llama-1.1b-random", "mode": "streamed", "method": recipe, "w_bits": 4, "a_bits": 8,
               "layers": BIG["num_hidden_layers"], "params": params, "processes": 1, "calib_seconds": m["seconds"],
               "peak_mem_mb": m["peak_rss_mb"], "under_3gb": m["peak_rss_mb"] < 3072}
        print(row, flush=True)
        rows.append(row)
    return rows


def dp_rows(tmp: Path) -> list[dict]:
    model_dir = tmp / "dp"
    params = write_random_model(model_dir, num_hidden_layers=4, **WIDTH)
    rows = []
    samples = DP_SPEC["samples"]
    for nproc in (1, 2):
        m = measure(dict(DP_SPEC, mode="streamed", model_dir=str(model_dir), out_dir=str(tmp / f"dp{nproc}")), nproc)
        rows.append({"part": "dp", "model": "llama-w512-L4", "mode": "streamed", "method": "repquant", "w_bits": 4,
                     "a_bits": 8, "layers": 4, "params": params, "processes": nproc, "calib_seconds": m["seconds"],
                     "peak_mem_mb": m["peak_rss_mb"], "samples_per_s": round(samples / m["seconds"], 3)})
        print(rows[-1], flush=True)
    rows[-1]["speedup"] = round(rows[0]["calib_seconds"] / rows[-1]["calib_seconds"], 2)
    return rows


def gpu_rows(tmp: Path, log: Path) -> list[dict]:
    """The streamed path with ``--device cuda`` (the CPU run beside it uses every core); each row is
    appended to ``log`` as soon as it is measured."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--parts gpu needs a CUDA device")
    gpu_name, threads = torch.cuda.get_device_name(0), os.cpu_count()
    rows: list[dict] = []

    def record(row: dict) -> None:
        row = {"part": "gpu", "mode": "streamed", "processes": 1, "gpu": gpu_name, "threads": threads, **row}
        rows.append(row)
        print(row, flush=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")

    model_dir = tmp / "gpu-small"
    params = write_random_model(model_dir, num_hidden_layers=4, **WIDTH)
    seconds = {}
    for device in ("cpu", "cuda"):
        spec = dict(DP_SPEC, mode="streamed", model_dir=str(model_dir), out_dir=str(tmp / f"gpu-small-{device}"),
                    device=device, threads=threads)
        m = measure(spec)
        seconds[device] = m["seconds"]
        record({"model": "llama-w512-L4", "method": "repquant", "w_bits": 4, "a_bits": 8, "layers": 4, "params": params,
                "device": device, "calib_seconds": m["seconds"], "peak_mem_mb": m["peak_rss_mb"],
                "gpu_peak_mb": m.get("gpu_peak_mb"), "samples_per_s": round(DP_SPEC["samples"] / m["seconds"], 3),
                "speedup": round(seconds["cpu"] / m["seconds"], 2) if device == "cuda" else None})
    model_dir = tmp / "big"
    params = write_random_model(model_dir, dtype="float16", **BIG)
    for recipe, options in BIG_RECIPES:
        m = measure(big_spec(model_dir, tmp, recipe, options, device="cuda", threads=threads))
        record({"model": "llama-1.1b-random", "method": recipe, "w_bits": 4, "a_bits": 8,
                "layers": BIG["num_hidden_layers"], "params": params, "device": "cuda", "calib_seconds": m["seconds"],
                "peak_mem_mb": m["peak_rss_mb"], "gpu_peak_mb": m["gpu_peak_mb"], "under_3gb": m["peak_rss_mb"] < 3072})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["depth", "big", "dp"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--code", help="the library source's stamp, where the run is on a copy without git "
                        "(a lent GPU machine): git rev-parse HEAD:src/reparq | cut -c1-12")
    parser.add_argument("--rows", type=Path, help="with --parts gpu: write scale_gpu.{md,json} from the rows log "
                        "(scale_gpu.rows.jsonl) a lent GPU machine sent back, without measuring")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    from reparq.report.results import source_version, write_results

    code = args.code or source_version()
    if "gpu" in args.parts:
        if args.parts != ["gpu"]:
            parser.error("--parts gpu runs on its own (another machine, another results file)")
        return gpu_main(args, code, argv)

    previous: dict[str, list[dict]] = {}
    path = args.out / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "command": ""}
    for r in old["rows"]:  # parts not re-run keep their rows
        previous.setdefault(r["part"], []).append(r)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    # One entry per part set: a part re-run replaces the command that last measured it.
    kept = [c for c in old["command"].split("; ") if c and not any(p in c for p in args.parts)]
    command = "; ".join(kept + [command.strip()])
    with tempfile.TemporaryDirectory(prefix="reparq-scale-") as tmp:
        for part in args.parts:
            previous[part] = {"depth": depth_rows, "big": big_rows, "dp": dp_rows}[part](Path(tmp))
            for r in previous[part]:  # the library source that measured it (parts not re-run keep theirs)
                r["code"] = code
    rows = [r for part in ("depth", "big", "dp") for r in previous.get(part, [])]
    streamed = {r["layers"]: r["peak_mem_mb"] for r in rows if r["part"] == "depth" and r["mode"] == "streamed"}
    notes = ("Peak memory = the calibrating process's peak RSS (imports included). Targets (issue 9): streamed peak "
             "flat from 4 to 32 layers (<= 1.5x), the 1.1B model under 3 GB, 2 gloo processes no slower per sample "
             "than 1.")
    if 4 in streamed and 32 in streamed:
        notes += f" Measured: streamed peak 32 vs 4 layers = {streamed[32] / streamed[4]:.2f}x."
    write_results(args.out, "scale", command, rows, notes,
                  extra_columns=("part", "mode", "layers", "params", "processes", "samples_per_s", "speedup", "under_3gb",
                                 "code"))
    return 0


def gpu_main(args, code: str | None, argv: list[str] | None) -> int:
    """``--parts gpu``: another machine, so its own results file (scale_gpu). The rows log opens
    with that machine's environment, so that ``--rows LOG`` can write the results file here from
    what a lent machine sent back, also when its run was cut short."""
    from reparq.report.results import environment

    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.rows:
        return write_gpu_results(args.out, args.rows, command)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "scale_gpu.rows.jsonl"
    log.write_text(json.dumps({"environment": environment(), "command": command, "code": code}) + "\n")
    with tempfile.TemporaryDirectory(prefix="reparq-scale-") as tmp:
        gpu_rows(Path(tmp), log)
    return write_gpu_results(args.out, log, command)


def write_gpu_results(out: Path, log: Path, command: str) -> int:
    from reparq.report.results import command_history, write_results

    entries = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    head = next(e for e in entries if "environment" in e)
    rows = [{**e, "code": head["code"]} for e in entries if "part" in e]
    expected = 2 + len(BIG_RECIPES)
    notes = GPU_NOTES
    if len(rows) < expected:
        notes += (f" This run was cut short after {len(rows)} of its {expected} rows (the lent machine's time limit);"
                  " the missing rows were not measured.")
    if command != head["command"]:  # written here from a log sent back: both commands, in order
        command = command_history(head["command"], command)
    write_results(out, "scale_gpu", command, rows, notes,
                  extra_columns=("device", "gpu", "threads", "layers", "params", "gpu_peak_mb", "samples_per_s",
                                 "speedup", "under_3gb", "code"), measured_on=head["environment"])
    return 0


GPU_NOTES = ("The streamed path on a lent GPU machine (issue 9's --device cuda). Each row is its own fresh "
             "process; peak MB = the process's peak RSS (imports included), gpu_peak_mb = torch's peak allocated "
             "GPU memory. The two llama-w512-L4 rows are one run's CPU (every core) and GPU calibration of the "
             "same model and data: speedup = CPU seconds / GPU seconds. The 1.1B rows are the scale benchmark's "
             "big part on the GPU (random weights: memory and time, not accuracy). Statistics, GPTQ's "
             "float64 solve and the cached activations stay on the CPU by design.")


if __name__ == "__main__":
    sys.exit(main())
