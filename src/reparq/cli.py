"""The ``reparq`` command: quantize, eval, demo, recipes, zoo list/train."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from reparq.errors import ReparqError
from reparq.progress import Reporter

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Accurate post-training quantization through reparameterization.")
zoo_app = typer.Typer(no_args_is_help=True, help="The project's own Fashion-MNIST models.")
app.add_typer(zoo_app, name="zoo")
# Piped output has no terminal width to follow: keep result rows on one line rather than 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)

DEMO_RECIPES = ("minmax", "percentile", "mse", "mae", "repapq")
DEMO_BITS = ("W8A8", "W6A6", "W4A4")


def _zoo_name(model: str) -> str:
    name = model.removeprefix("zoo:")
    if ":" in name:
        raise ReparqError(f"model source {model!r} is not supported yet; use zoo:NAME (see `reparq zoo list`)")
    return name


class RichReporter(Reporter):
    """Shows each stage (observe, reconstruct, evaluate) of each job as one rich progress bar."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.task, self.label = bar, bar.add_task("", total=1, info=""), ""

    def stage(self, description: str, total: int) -> None:
        self.bar.reset(self.task, total=max(1, total), description=f"{self.label} {description}".strip(), info="")

    def advance(self, n: int = 1, info: str = "") -> None:
        self.bar.update(self.task, advance=n, info=info)


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=err_console, disable=quiet, transient=True)


def _recipe_options(recipes: list[str], iters: int | None, blocks: str) -> dict:
    """CLI flags that only reconstruction recipes take; refuse them for recipes that do not."""
    from reparq.recipes.registry import get_recipe

    options = {}
    if iters is not None:
        options["iters"] = iters
    globs = tuple(g.strip() for g in blocks.split(",") if g.strip())
    if globs:
        options["block_globs"] = globs
    if options:
        plain = [r for r in recipes if get_recipe(r).options is None]
        if plain:
            raise ReparqError(f"--iters/--blocks apply to reconstruction recipes only, not {', '.join(plain)}")
    return options


def _run(model: str, recipes: list[str], bits: list[str], seed: int, calib_size: int, quiet: bool,
         as_json: bool, title: str, options: dict | None = None, save_dir: str | None = None) -> list[dict]:
    import torch

    from reparq.data import calibration_subset, load_fashion_mnist
    from reparq.eval.accuracy import top1
    from reparq.eval.grid import Bits, fp_row, run_grid
    from reparq.recipes.registry import get_recipe
    from reparq.report.tables import rich_table
    from reparq.zoo import load_model

    name = _zoo_name(model)
    parsed_bits = [Bits.parse(b) for b in bits]
    for r in recipes:
        get_recipe(r)  # fail on a bad name before any work
    from reparq.config import QuantConfig

    for b in parsed_bits:
        QuantConfig(w_bits=b.w, a_bits=b.a)
    torch.manual_seed(seed)
    net = load_model(name)
    calib = calibration_subset(calib_size, seed=seed)
    test_x, test_y = load_fashion_mnist("test")
    with _progress(quiet or as_json) as bar:
        reporter = RichReporter(bar)
        reporter.label = f"{name} FP"
        fp = top1(net, test_x, test_y, reporter=reporter)
        finished = []
        rows = run_grid(net, name, calib, test_x, test_y, recipes, parsed_bits, seeds=(seed,), fp=fp,
                        reporter=reporter, on_model=lambda row, qm: finished.append(qm), **(options or {}))
    if save_dir:  # only once everything succeeded: nothing half-written
        from reparq.deploy.serialize import save

        save(finished[-1], save_dir, source=f"zoo:{name}")
        err_console.print(f"saved to {save_dir}")
    rows = [fp_row(name, round(fp, 2))] + rows
    title += " (top-1 %, Δ vs FP)"
    if as_json:
        print(json.dumps({"rows": rows}, indent=2))
    else:
        console.print(rich_table(rows, title=title))
    return rows


MODEL_HELP = "zoo:NAME | timm:NAME (with --weights) | hf:DIR | module:function | file.py:function (default zoo:repvgg_fm)"
GROUP_HELP = "weight scales per N input columns of each Linear (W4A16 LLMs: 32-128; default: one per channel)"
CALIB_HELP = "zoo:fashion_mnist | images:DIR | text:FILE | tensor:FILE (default zoo:fashion_mnist)"


@app.command()
def quantize(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="see `reparq recipes` (default mse)"),
    w_bits: Optional[int] = typer.Option(None, "--w-bits", help="weight bits, 2..8 (default 8)"),
    a_bits: Optional[int] = typer.Option(None, "--a-bits", help="activation bits, 2..8 (default 8)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="(default 0)"),
    calib_size: Optional[int] = typer.Option(None, "--calib-size", help="calibration samples (default 1024)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print rows as JSON instead of a table"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list every quantization point; calibrate nothing"),
    blocks: str = typer.Option("", "--blocks", help="comma-separated globs naming the blocks (default: the family table, else repeated modules)"),
    iters: Optional[int] = typer.Option(None, "--iters", help="reconstruction iterations per block"),
    w_group_size: Optional[int] = typer.Option(None, "--w-group-size", help=GROUP_HELP),
    save_dir: Optional[str] = typer.Option(None, "--save", help="write the quantized model to this directory"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a shipped preset, e.g. w4a4, rep-w4a4-fast"),
    config_file: Optional[str] = typer.Option(None, "--config", "-c", help="a run config YAML; flags override it"),
    weights: Optional[str] = typer.Option(None, "--weights", help="local weights file for timm:NAME"),
    calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
) -> None:
    """Quantize a model with one recipe (or a preset or config file) and print FP vs quantized results."""
    from reparq.runconfig import check_globs, execute, from_cli, is_zoo_run
    from reparq.sources import load_model_source

    run = from_cli(config_file, preset, model=model, weights=weights, recipe=recipe, w_bits=w_bits, a_bits=a_bits,
                   seed=seed, calib=calib, calib_size=calib_size, iters=iters, blocks=blocks,
                   w_group_size=w_group_size)
    if dry_run:
        _dry_run(run, as_json)
        return
    if not is_zoo_run(run):
        with _progress(quiet or as_json) as bar:
            row = execute(run, RichReporter(bar), save_dir=save_dir)
        if save_dir:
            err_console.print(f"saved to {save_dir}")
        if as_json:
            print(json.dumps({"rows": [row]}, indent=2))
        else:
            from reparq.report.tables import rich_table

            console.print(rich_table([row], title=f"{row['model']}: {run.recipe} W{run.w_bits}A{run.a_bits} "
                                                  f"({row['metric']} on {row['evaluated_on']})",
                                     extra=("output_sqnr_db",)))
        return
    check_globs(run, load_model_source(run.model))
    _run(run.model, [run.recipe], [f"{run.w_bits}/{run.a_bits}"], run.seed, run.calib.size, quiet, as_json,
         title=f"{_zoo_name(run.model)}: {run.recipe} W{run.w_bits}A{run.a_bits}", options=run.option_kwargs(),
         save_dir=save_dir)


def _dry_run(run, as_json: bool) -> None:
    from reparq.recipes.plan import plan_for, plan_table
    from reparq.runconfig import check_globs
    from reparq.sources import load_model_source, short_name

    model = load_model_source(run.model, run.weights)
    try:
        check_globs(run, model)
    except ReparqError as exc:  # the dry run is where names are looked up: warn, do not stop
        err_console.print(f"warning: {exc}", highlight=False, soft_wrap=True)
    result = plan_for(model, run)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    name = short_name(run.model)
    console.print(plan_table(result, title=f"{name}, {run.recipe} W{run.w_bits}A{run.a_bits}: "
                                           f"{len(result['points'])} quantization points in {len(result['layers'])} "
                                           f"layers, {len(result['units'])} units ({result['merged_blocks']} Rep "
                                           f"blocks merged, {result['folded_bn']} BN folded)"))
    if result["unit_error"]:
        err_console.print(f"note: {result['unit_error']}")


@app.command("eval")
def evaluate(
    model: str = typer.Option("zoo:repvgg_fm", "--model", "-m", help="zoo:NAME"),
    recipes: str = typer.Option("", "--recipe", "-r", help="comma-separated recipes; empty: FP only"),
    bits: str = typer.Option("W8A8", "--bits", "-b", help="comma-separated, e.g. W8A8,W4A4"),
    seed: int = typer.Option(0, "--seed"),
    calib_size: int = typer.Option(1024, "--calib-size"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
    iters: Optional[int] = typer.Option(None, "--iters", help="reconstruction iterations per block"),
) -> None:
    """Evaluate a model in float, and with each recipe x bit width given."""
    recipe_list = [r.strip() for r in recipes.split(",") if r.strip()]
    _run(model, recipe_list, [b for b in bits.split(",") if b.strip()] if recipe_list else [], seed, calib_size,
         quiet, as_json, title=f"{_zoo_name(model)} on Fashion-MNIST test (10k)",
         options=_recipe_options(recipe_list, iters, ""))


@app.command()
def demo(
    model: str = typer.Option("zoo:repvgg_fm", "--model", "-m"),
    calib_size: int = typer.Option(1024, "--calib-size"),
    recipes: str = typer.Option(",".join(DEMO_RECIPES), "--recipes", help="comma-separated; see `reparq recipes`"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Quantize the zoo RepVGG with every range baseline and RepAPQ at W8A8, W6A6 and W4A4 and print the table."""
    _run(model, [r.strip() for r in recipes.split(",") if r.strip()], list(DEMO_BITS), 0, calib_size, quiet, False,
         title=f"reparq demo: {_zoo_name(model)} (merged) on Fashion-MNIST")


@app.command()
def recipes() -> None:
    """List the recipes."""
    from rich.table import Table

    from reparq.recipes.registry import get_recipe, list_recipes

    table = Table("recipe", "what it does")
    for name in list_recipes():
        table.add_row(name, get_recipe(name).description)
    console.print(table)


def _invocation(ctx: typer.Context) -> str:
    """The command as typed (flags that differ from their defaults), for reports to quote."""
    import shlex

    parts = ["reparq", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or value == param.default or not param.opts or param.name in ("quiet",
                                                                                                        "as_json"):
            continue  # flags that do not change the result are left out
        parts += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    return shlex.join(parts)


@app.command()
def report(
    ctx: typer.Context,
    out: str = typer.Option("reparq-report", "--out", "-o", help="folder for report.html, report.md, PNGs, JSON"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a shipped preset, e.g. w4a4"),
    config_file: Optional[str] = typer.Option(None, "--config", "-c", help="a run config YAML; flags override it"),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r"),
    w_bits: Optional[int] = typer.Option(None, "--w-bits"),
    a_bits: Optional[int] = typer.Option(None, "--a-bits"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
    calib_size: Optional[int] = typer.Option(None, "--calib-size"),
    iters: Optional[int] = typer.Option(None, "--iters", help="reconstruction iterations per block"),
    w_group_size: Optional[int] = typer.Option(None, "--w-group-size", help=GROUP_HELP),
    blocks: str = typer.Option("", "--blocks", help="comma-separated block globs (default: the family table, else repeated modules)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="local weights file for timm:NAME"),
    eval_size: int = typer.Option(2000, "--eval-size", help="held-out samples for the accuracy table"),
    top: int = typer.Option(3, "--top", help="range histograms for this many worst layers"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="print the accuracy rows and written files as JSON"),
) -> None:
    """Quantize, then write an HTML report (and Markdown + PNGs): accuracy, SQNR, ranges, loss curves, cost."""
    from reparq.report.html import run_report
    from reparq.report.tables import rich_table
    from reparq.runconfig import from_cli

    run = from_cli(config_file, preset, model=model, weights=weights, recipe=recipe, w_bits=w_bits, a_bits=a_bits,
                   seed=seed, calib=calib, calib_size=calib_size, iters=iters, blocks=blocks,
                   w_group_size=w_group_size)
    command = _invocation(ctx)
    with _progress(quiet or as_json) as bar:
        data, files = run_report(run, out, command, eval_size=eval_size, top=max(1, top), reporter=RichReporter(bar))
    if as_json:
        print(json.dumps({"rows": data.rows, "output_sqnr_db": data.output_sqnr_db,
                          "files": [str(f) for f in files.values()]}, indent=2))
    else:
        console.print(rich_table(data.rows, title=data.title))
        err_console.print(f"wrote {', '.join(str(f) for f in files.values())}")


@app.command()
def sensitivity(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    w_bits: int = typer.Option(4, "--w-bits", help="bits each layer is tried at"),
    a_bits: int = typer.Option(4, "--a-bits"),
    budget: float = typer.Option(1.0, "--budget", help="allowed drop in points (accuracy, or agreement with FP)"),
    metric: str = typer.Option("accuracy", "--metric", help="rank by accuracy drop, or by output SQNR (faster)"),
    granularity: str = typer.Option("layer", "--granularity", "-g", help="layer | block"),
    recipe: str = typer.Option("mse", "--recipe", "-r", help="range recipe: minmax, percentile, mse, mae"),
    config_file: Optional[str] = typer.Option(None, "--config", "-c", help="take model and data from a run config"),
    weights: Optional[str] = typer.Option(None, "--weights", help="local weights file for timm:NAME"),
    calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
    calib_size: Optional[int] = typer.Option(256, "--calib-size"),
    blocks: str = typer.Option("", "--blocks", help="block globs for --granularity block on an unknown model"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    eval_size: int = typer.Option(2000, "--eval-size", help="held-out samples each candidate is scored on"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="write the result as JSON to this file"),
    save_config: Optional[str] = typer.Option(None, "--save-config", help="write the suggested run config (YAML)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Quantize one layer (or block) at a time, rank them, and suggest which to keep at 8 bits."""
    from pathlib import Path

    from rich.table import Table

    from reparq.runconfig import from_cli
    from reparq.sensitivity import run_sensitivity, suggested_config
    from reparq.sources import short_name

    globs = tuple(g.strip() for g in blocks.split(",") if g.strip())
    run = from_cli(config_file, None, model=model, weights=weights, recipe=recipe, w_bits=w_bits, a_bits=a_bits,
                   seed=seed, calib=calib, calib_size=calib_size)
    if globs:
        run = run.model_copy(update={"options": {**run.options, "block_globs": globs}})
    with _progress(quiet or as_json) as bar:
        result = run_sensitivity(run, budget, metric=metric, granularity=granularity, eval_size=eval_size,
                                 reporter=RichReporter(bar))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    if save_config:
        Path(save_config).write_text(suggested_config(result, run).to_yaml())
    if as_json:
        print(json.dumps(result, indent=1))
        return
    score = "drop" if metric == "accuracy" else "sqnr_db"
    table = Table("rank", granularity, "layers", "drop (points)" if score == "drop" else "output SQNR dB",
                  title=f"{short_name(run.model)}: one {granularity} at a time at W{w_bits}A{a_bits} "
                        f"({result['score_kind']} "
                        f"on {result['evaluated_on']}; FP {result['fp']:.2f})")
    for r in result["rows"]:
        table.add_row(str(r["rank"]), r["unit"], str(len(r["layers"])), f"{r[score]:.2f}")
    console.print(table)
    s = result["suggestion"]
    verdict = "within" if s["within_budget"] else "NOT within (even all at 8 bits)"
    console.print(f"all at W{w_bits}A{a_bits}: {result['all_low']:.2f}; all at W8A8: {result['all_8bit']:.2f}; "
                  f"keep {len(s['keep_8bit'])} at W8A8 -> {s['score']:.2f} ({-s['drop']:+.2f}, {verdict} budget "
                  f"{budget:g}): {', '.join(s['keep_8bit']) or 'none'}", highlight=False, soft_wrap=True)


@app.command("export")
def export(
    paths: list[str] = typer.Argument(..., help="SAVED_DIR OUT.onnx (a `reparq quantize --save` folder), "
                                                "or OUT.onnx alone with --model"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="zoo:NAME: quantize it, then export"),
    recipe: str = typer.Option("mse", "--recipe", "-r", help="with --model"),
    w_bits: int = typer.Option(8, "--w-bits", help="with --model"),
    a_bits: int = typer.Option(8, "--a-bits", help="with --model"),
    seed: int = typer.Option(0, "--seed", help="with --model"),
    calib_size: int = typer.Option(1024, "--calib-size", help="with --model"),
    weight_dtype: str = typer.Option("auto", "--weight-dtype", help="auto | int8 | uint8 (README: ONNX export)"),
    requantize: bool = typer.Option(True, "--requantize/--no-requantize",
                                    help="int8 kernels for convs nothing requantizes (one extra rounding); "
                                         "--no-requantize: exactly the fake-quant values, those convs in float"),
    runtime: str = typer.Option("any", "--runtime", help="onnx: any (standard QDQ operators) or onnxruntime (plus "
                                                         "ORT's fused integer kernels: faster there, runs only there)"),
    check: bool = typer.Option(False, "--check", help="onnx: compare ORT with PyTorch on the test split; hf: load "
                                                       "the export with transformers, compare perplexity and logits"),
    check_size: Optional[int] = typer.Option(None, "--check-size",
                                             help="test images (onnx, default 10000) or token windows (hf, default 64)"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (ONNX QDQ file) or hf (Hugging Face "
                                                        "compressed-tensors directory: transformers, vLLM)"),
    source: Optional[str] = typer.Option(None, "--source", help="hf: zoo:NAME or the float model's directory "
                                                               "(config, tokenizer), when the saved model does not say"),
    activations: str = typer.Option("static", "--activations", help="hf, W8A8: static (reparq's calibrated ranges) "
                                                                    "or dynamic (per-token ranges at run time)"),
    check_data: Optional[str] = typer.Option(None, "--check-data", help="hf --check: text:FILE or tensor:FILE "
                                                                       "(default for zoo models: held-out windows)"),
    quantize_embedding: bool = typer.Option(False, "--quantize-embedding",
                                            help="hf: a tied embedding keeps the output layer's integers (smaller; "
                                                 "transformers loads it, vLLM does not)"),
) -> None:
    """Write a quantized model as an ONNX QDQ graph that ONNX Runtime runs with int8 kernels, or
    (--format hf) as a Hugging Face compressed-tensors checkpoint that transformers and vLLM load."""
    import torch

    import reparq

    if fmt == "hf":
        _export_hf(paths, model, recipe, w_bits, a_bits, seed, calib_size, source, activations, check, check_size,
                   check_data, quantize_embedding)
        return
    if fmt != "onnx":
        raise ReparqError(f"--format must be onnx or hf, got {fmt!r}")
    from reparq.zoo.architectures import IMG_SIZE, IN_CHANS

    if len(paths) not in (1, 2) or (len(paths) == 2) == (model is not None):
        raise ReparqError("give SAVED_DIR OUT.onnx, or OUT.onnx with --model zoo:NAME (not both, not neither)")
    out = paths[-1]
    if len(paths) == 2:
        qmodel = reparq.load(paths[0])
    else:
        from reparq.data import calibration_subset
        from reparq.zoo import load_model

        qmodel = reparq.quantize(load_model(_zoo_name(model)), calibration_subset(calib_size, seed=seed),
                                 recipe=recipe, w_bits=w_bits, a_bits=a_bits, seed=seed)
    path = reparq.export_onnx(qmodel, out, torch.zeros(1, IN_CHANS, IMG_SIZE, IMG_SIZE), weight_dtype=weight_dtype,
                              requantize=requantize, runtime=runtime)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", highlight=False)
    if check:
        from reparq.data import load_fashion_mnist
        from reparq.deploy.ort_runner import compare

        test_x, test_y = load_fashion_mnist("test")
        n = 10000 if check_size is None else check_size
        result = compare(qmodel, path, test_x[:n], test_y[:n])
        console.print(result.summary(), highlight=False, soft_wrap=True)


def _zoo_lm_windows(name: str, size: int, seed: int, held_out: bool) -> torch.Tensor:
    """Token windows of a zoo decoder's text: random training windows (calibration) or the
    held-out windows its card's perplexity was measured on."""
    import torch

    from reparq.zoo import model_card
    from reparq.zoo.train_lm import lm_data, load_tokenizer

    seq_len = model_card(name)["recipe"]["seq_len"]
    stream, held = lm_data(load_tokenizer(name), seq_len)
    if held_out:
        return held[:size]
    starts = torch.randint(0, stream.numel() - seq_len, (size,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def _export_hf(paths: list[str], model: str | None, recipe: str, w_bits: int, a_bits: int, seed: int,
               calib_size: int, source: str | None, activations: str, check: bool, check_size: int | None,
               check_data: str | None, quantize_embedding: bool = False) -> None:
    """``reparq export --format hf``: SAVED_DIR OUT_DIR (a saved or streamed model), or OUT_DIR
    with --model zoo:NAME (a zoo decoder, quantized here with attention matmuls left float)."""
    import reparq
    from reparq.deploy.hf_check import check_export, directory_size_mb

    if len(paths) not in (1, 2) or (len(paths) == 2) == (model is not None):
        raise ReparqError("give SAVED_DIR OUT_DIR, or OUT_DIR with --model zoo:NAME (not both, not neither)")
    out = paths[-1]
    qmodel = None
    if model is not None:
        from reparq.zoo import load_model

        name = _zoo_name(model)
        source = source or f"zoo:{name}"
        # The format has no place for quantized attention matmuls: they stay float.
        options = {"ignore": ("*self_attn",)} if a_bits < 16 else {}
        qmodel = reparq.quantize(load_model(name), _zoo_lm_windows(name, min(calib_size, 256), seed, False),
                                 recipe=recipe, w_bits=w_bits, a_bits=a_bits, seed=seed, batch_size=8, **options)
    path = reparq.export_hf(qmodel if qmodel is not None else paths[0], out, source=source, activations=activations,
                            quantize_embedding=quantize_embedding)
    console.print(f"wrote {path} ({directory_size_mb(path):.2f} MiB of tensors)", highlight=False)
    if check:
        if qmodel is None:  # the float architecture from --source when the saved model does not name one
            from reparq.deploy.serialize import _model_from_source

            arch = None
            if source:
                arch = _model_from_source(Path(paths[0]), source if source.startswith(("zoo:", "hf:"))
                                          else f"hf:{source}")
            qmodel = reparq.load(paths[0], model=arch)
        n = 64 if check_size is None else check_size
        src = source or (getattr(qmodel, "reparq_info", None) and qmodel.reparq_info.extra.get("source")) or ""
        if check_data is None:
            if not str(src).startswith("zoo:"):
                raise ReparqError("--check needs --check-data text:FILE or tensor:FILE (held-out windows are known "
                                  "only for zoo models)")
            windows = _zoo_lm_windows(str(src).removeprefix("zoo:"), n, seed, True)
        else:
            from types import SimpleNamespace

            from reparq.sources import load_calibration

            spec = SimpleNamespace(source=check_data, size=n, seq_len=128)
            windows = load_calibration(spec, model_source=f"hf:{str(src).removeprefix('hf:')}", seed=seed)
        console.print(check_export(path, qmodel, windows).table(), highlight=False)


@zoo_app.command("list")
def zoo_list() -> None:
    """List zoo models with their FP accuracy."""
    from rich.table import Table

    from reparq.zoo.registry import checkpoint_path, list_models, model_card

    table = Table("model", "FP top-1", "params", "size MB", "trained by")
    for name in list_models(trained_only=False):
        if checkpoint_path(name).exists():
            card = model_card(name)
            table.add_row(name, f"{card['fp_top1']:.2f}", f"{card['params']:,}",
                          f"{checkpoint_path(name).stat().st_size / 1e6:.2f}", card["command"])
        else:
            table.add_row(name, "-", "-", "-", f"not trained: reparq zoo train {name}")
    console.print(table)


@zoo_app.command("train")
def zoo_train(
    names: Optional[list[str]] = typer.Argument(None, help="zoo model names"),
    all_models: bool = typer.Option(False, "--all", help="train every zoo model"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train zoo checkpoints on Fashion-MNIST (writes src/reparq/zoo/checkpoints)."""
    from reparq.zoo.train import TRAIN_RECIPES, train

    chosen = list(TRAIN_RECIPES) if all_models else list(names or [])
    if not chosen:
        raise ReparqError("name at least one model to train, or pass --all")
    for name in chosen:
        card = train(name, epochs, seed, log=err_console.print)
        console.print(f"{name}: FP top-1 {card['fp_top1']:.2f}%")


@app.command()
def stream(
    model_dir: str = typer.Argument(..., help="Hugging Face decoder directory: config.json + (sharded) safetensors"),
    calib: str = typer.Option(..., "--calib", help="text:FILE (cut into windows by the model's tokenizer) "
                              "or tensor:FILE (a safetensors file of token ids [N, T])"),
    out: str = typer.Option(..., "--out", "-o", help="directory for the quantized model (reparq.load reads it)"),
    recipe: str = typer.Option("repqvit", "--recipe", "-r", help="repqvit or repquant"),
    w_bits: int = typer.Option(8, "--w-bits"),
    a_bits: int = typer.Option(8, "--a-bits"),
    seed: int = typer.Option(0, "--seed"),
    calib_size: int = typer.Option(128, "--calib-size", help="calibration windows"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per window (text:FILE)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    iters: Optional[int] = typer.Option(None, "--iters", help="repquant: weight reconstruction steps per layer"),
    clip_iters: Optional[int] = typer.Option(None, "--clip-iters", help="repquant: dual-clipping steps per layer"),
    w_group_size: Optional[int] = typer.Option(None, "--w-group-size", help=GROUP_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]"),
    work_dir: Optional[str] = typer.Option(None, "--work-dir", help="resume state (default OUT/.stream-state)"),
    restart: bool = typer.Option(False, "--restart", help="ignore a previous run's state and start over"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Quantize a decoder one layer at a time (memory: one layer + cached activations); rerun the
    same command to resume after an interruption; run under `torchrun --nproc-per-node N -m
    reparq.cli stream ...` to split the calibration data over N processes."""
    from types import SimpleNamespace

    from reparq.parallel import data_parallel
    from reparq.sources import load_calibration
    from reparq.stream import quantize_streamed

    options = {k: v for k, v in (("iters", iters), ("clip_iters", clip_iters), ("w_group_size", w_group_size))
               if v is not None}
    spec = SimpleNamespace(source=calib, size=calib_size, seq_len=seq_len)
    ids = load_calibration(spec, model_source=f"hf:{model_dir}", seed=seed)
    with data_parallel() as dp, _progress(quiet or (dp is not None and dp.rank > 0)) as bar:
        reporter = RichReporter(bar)
        result = quantize_streamed(model_dir, ids, out, recipe=recipe, w_bits=w_bits, a_bits=a_bits, seed=seed,
                                   batch_size=batch_size, device=device, work_dir=work_dir, restart=restart,
                                   reporter=reporter, **options)
        if dp is None or dp.rank == 0:
            resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
            console.print(f"{result.out_dir}: {result.steps} steps ({result.steps - 1} layers + head){resumed}; "
                          f"calibration {result.calib_seconds:.1f} s, peak memory {result.peak_mem_mb:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except ReparqError as exc:
        err_console.print(f"error: {exc}", highlight=False, soft_wrap=True)
        return 2
    except typer.Abort:
        return 130
    except typer.TyperException as exc:  # usage errors: unknown flag, bad value type
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err_console.print(f"error: {exc}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
