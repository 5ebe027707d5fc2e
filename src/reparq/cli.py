"""The ``reparq`` command: quantize, eval, demo, recipes, zoo list/train."""

from __future__ import annotations

import json
import sys
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

DEMO_RECIPES = ("minmax", "percentile", "mse", "mae")
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


@app.command()
def quantize(
    model: str = typer.Option("zoo:repvgg_fm", "--model", "-m", help="zoo:NAME"),
    recipe: str = typer.Option("mse", "--recipe", "-r", help="see `reparq recipes`"),
    w_bits: int = typer.Option(8, "--w-bits", help="weight bits, 2..8"),
    a_bits: int = typer.Option(8, "--a-bits", help="activation bits, 2..8"),
    seed: int = typer.Option(0, "--seed"),
    calib_size: int = typer.Option(1024, "--calib-size", help="calibration images from the training split"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print rows as JSON instead of a table"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list layers, bits, blocks and stages; calibrate nothing"),
    blocks: str = typer.Option("", "--blocks", help="comma-separated globs naming the blocks of an unknown model"),
    iters: Optional[int] = typer.Option(None, "--iters", help="reconstruction iterations per block"),
    save_dir: Optional[str] = typer.Option(None, "--save", help="write the quantized model to this directory"),
) -> None:
    """Quantize a model with one recipe and print FP vs quantized accuracy."""
    if dry_run:
        _dry_run(model, recipe, w_bits, a_bits, blocks, as_json)
        return
    _run(model, [recipe], [f"{w_bits}/{a_bits}"], seed, calib_size, quiet, as_json,
         title=f"{_zoo_name(model)}: {recipe} W{w_bits}A{a_bits}", options=_recipe_options([recipe], iters, blocks),
         save_dir=save_dir)


def _dry_run(model: str, recipe: str, w_bits: int, a_bits: int, blocks: str, as_json: bool) -> None:
    from rich.table import Table

    from reparq.config import QuantConfig
    from reparq.recipes.plan import plan
    from reparq.recipes.registry import get_recipe
    from reparq.zoo import load_model

    spec = get_recipe(recipe)
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, **spec.defaults)
    globs = tuple(g.strip() for g in blocks.split(",") if g.strip()) or None
    result = plan(load_model(_zoo_name(model)), config, block_globs=globs)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    table = Table("layer", "type", "W", "A", "unit", "stage",
                  title=f"{_zoo_name(model)}: {len(result['layers'])} quantized layers in {len(result['units'])} units "
                        f"({result['merged_blocks']} Rep blocks merged, {result['folded_bn']} BN folded)")
    for r in result["layers"]:
        table.add_row(r["layer"], r["type"], str(r["w_bits"]), str(r["a_bits"]), r["unit"], r["stage"])
    console.print(table)
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
    """Quantize the zoo RepVGG with every range baseline at W8A8, W6A6 and W4A4 and print the table."""
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
