"""One schema for a quantization run, its YAML form, and the shipped presets.

A run is: where the model comes from, which recipe at which bits, per-layer ``overrides`` and
``ignore`` globs, where the calibration data comes from and how much of it, and the recipe's
own options. The same :class:`RunConfig` is written by hand as YAML (``--config run.yaml``),
shipped as a preset (``--preset w4a4``, ``reparq.quantize(model, calib, config="w4a4")``) and
built from command-line flags, so the three can never disagree.

Validation errors are one line that names the bad key and what it allows, because the
person reading them is editing a YAML file and needs to know which line to fix.

Presets live in ``reparq/presets/*.yaml``, named ``<family>-w<b>a<b>[-fast]``:

- ``rep``: structurally reparameterized CNNs (RepVGG, MobileOne; any model with Rep blocks);
- ``vit``: transformers (timm ViT/Swin, HF encoders);
- ``cnn``: anything else (layer-wise recipes, no block layout needed).

The family-free names ``w8a8``, ``w6a6``, ``w4a4`` (and their ``-fast`` variants) pick the
family from the model itself (:func:`detect_family`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from reparq.errors import ReparqError

PRESET_DIR = Path(__file__).with_name("presets")
FAMILIES = ("rep", "vit", "cnn")
CONFIG_VERSION = 1
ARGUMENTS = "arguments"  # ``validate``'s ``where`` for values given as flags or keyword arguments
# QuantConfig fields that are top-level keys of a run (everything else goes under ``options``).
_TOP_LEVEL_QUANT_KEYS = ("w_bits", "a_bits", "ignore", "overrides")


def _parse_bits_pair(value: Any) -> tuple[int, int]:
    """An override's bits: ``W8A8`` / ``8/8``, ``[8, 8]`` or one integer for both."""
    from reparq.quant.uniform import check_bits

    if isinstance(value, str):
        text = value.strip().upper().replace("W", "").replace("A", "/")
        try:
            w, a = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"cannot read bit widths from {value!r}; write them as W8A8, 8/8 or [8, 8]") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        w = a = value
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        w, a = value
    else:
        raise ValueError(f"bits must be W8A8, 8/8, [8, 8] or 8, got {value!r}")
    return check_bits(w, "w_bits"), check_bits(a, "a_bits")


class CalibSpec(BaseModel):
    """Where calibration inputs come from (see :mod:`reparq.sources`) and how many."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("zoo:fashion_mnist", description="zoo:fashion_mnist | images:DIR | text:FILE | tensor:FILE")
    size: int = Field(1024, ge=1)
    batch_size: int = Field(64, ge=1)
    image_size: int | None = Field(None, ge=1, description="images:DIR: side length; default from the model")
    channels: int | None = Field(None, ge=1, le=4, description="images:DIR: 1 (grayscale) or 3; default from the model")
    mean: list[float] | None = None
    std: list[float] | None = None
    seq_len: int = Field(128, ge=4, description="text:FILE: tokens per sample")


class RunConfig(BaseModel):
    """A whole run. ``options`` are QuantConfig fields (``keep_first_last_8bit``, estimators, ...)
    and the recipe's own options (``iters``, ``block_globs``, ``abc_lambda``, ...)."""

    model_config = ConfigDict(extra="forbid")

    version: int = CONFIG_VERSION
    description: str = ""
    family: str = Field("any", description="the model family a preset is tuned for")
    model: str | None = Field(None, description="zoo:NAME | timm:NAME | hf:DIR | module:function | file.py:function")
    weights: str | None = Field(None, description="local weights file for timm:NAME")
    recipe: str = "mse"
    w_bits: int = 8
    a_bits: int = 8
    seed: int = 0
    ignore: list[str] = Field(default_factory=list)
    overrides: dict[str, tuple[int, int]] = Field(default_factory=dict)
    calib: CalibSpec = Field(default_factory=CalibSpec)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"this reparq reads config version {CONFIG_VERSION}, got {v}")
        return v

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in ("any",) + FAMILIES:
            raise ValueError(f"must be one of any, {', '.join(FAMILIES)}; got {v!r}")
        return v

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str) -> str:
        _recipe_spec(v)  # its error names the recipes there are
        return v

    @field_validator("w_bits", "a_bits", mode="before")
    @classmethod
    def _bits(cls, v: Any, info) -> int:
        from reparq.quant.uniform import check_bits

        return check_bits(v, info.field_name)

    @field_validator("overrides", mode="before")
    @classmethod
    def _overrides(cls, v: Any) -> dict:
        if not isinstance(v, dict):
            raise ValueError("must be a mapping {glob: W8A8}")
        out = {}
        for pattern, bits in v.items():
            try:
                out[str(pattern)] = _parse_bits_pair(bits)
            except ValueError as exc:
                raise ValueError(f"{pattern!r}: {exc}") from None
        return out

    @model_validator(mode="after")
    def _options(self) -> "RunConfig":
        allowed = allowed_options(self.recipe)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"options.{unknown[0]} does not exist for recipe {self.recipe!r}; "
                             f"allowed: {', '.join(allowed)}")
        self.options = {k: tuple(v) if isinstance(v, list) else v for k, v in self.options.items()}
        spec = _recipe_spec(self.recipe)
        if spec.options is not None:  # types of the recipe's own options, from its dataclass
            given = self.recipe_options()
            try:
                typed = TypeAdapter(spec.options).validate_python(given)
            except ValidationError as exc:
                e = exc.errors()[0]
                key, msg = ".".join(map(str, e["loc"])), str(e["msg"]).removeprefix("Value error, ")
                raise ValueError(f"config key 'options.{key}': {msg}" if key else f"options: {msg}") from None
            except ReparqError as exc:  # the options dataclass's own checks
                raise ValueError(f"options: {exc}") from None
            self.options.update({k: getattr(typed, k) for k in given})  # "5" from YAML becomes 5
        try:
            self.quant_config()  # value checks (estimator names, percentile range, ...)
        except ReparqError as exc:
            raise ValueError(f"options: {exc}") from None
        return self

    # -- what the run turns into ------------------------------------------------------------
    def recipe_options(self) -> dict:
        spec = _recipe_spec(self.recipe)
        names = {f.name for f in dataclasses.fields(spec.options)} if spec.options else set()
        return {k: v for k, v in self.options.items() if k in names}

    def quant_config(self):
        """The QuantConfig this run quantizes with (recipe defaults, then the run's own values)."""
        from reparq.config import QuantConfig

        spec = _recipe_spec(self.recipe)
        recipe_keys = set(self.recipe_options())
        values = {**spec.defaults, **{k: v for k, v in self.options.items() if k not in recipe_keys}}
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, ignore=tuple(self.ignore),
                           overrides=dict(self.overrides), **values)

    def option_kwargs(self) -> dict:
        """The ``**options`` of :func:`reparq.quantize`: the run's options, ignore globs and overrides."""
        options = dict(self.options)
        if self.ignore:
            options["ignore"] = tuple(self.ignore)
        if self.overrides:
            options["overrides"] = dict(self.overrides)
        return options

    def quantize_kwargs(self) -> dict:
        """Keyword arguments of :func:`reparq.quantize` (less the model and the data)."""
        return dict(recipe=self.recipe, w_bits=self.w_bits, a_bits=self.a_bits, seed=self.seed,
                    batch_size=self.calib.batch_size, **self.option_kwargs())

    def updated(self, **changes: Any) -> "RunConfig":
        """A validated copy with some keys changed (``None`` values are ignored; ``options`` and
        ``calib`` are merged key by key, not replaced)."""
        data = self.model_dump()
        for key, value in changes.items():
            if value is None:
                continue
            if key in ("options", "calib"):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        if "recipe" in changes and changes["recipe"] not in (None, self.recipe):
            # Options of the old recipe may not exist in the new one: keep only those that do.
            allowed = set(allowed_options(changes["recipe"])) if _known_recipe(changes["recipe"]) else set()
            data["options"] = {k: v for k, v in data["options"].items()
                               if k in allowed or k in (changes.get("options") or {})}
        return validate(data, ARGUMENTS)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        data["overrides"] = {k: f"W{w}A{a}" for k, (w, a) in self.overrides.items()}
        data["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        return yaml.safe_dump(data, sort_keys=False)


# -- recipe look-ups --------------------------------------------------------------------------

def _recipe_spec(name: str):
    from reparq.recipes.registry import get_recipe

    return get_recipe(name)


def _known_recipe(name: str) -> bool:
    from reparq.recipes.registry import list_recipes

    return name in list_recipes()


def allowed_options(recipe: str) -> list[str]:
    """Keys allowed under ``options`` for ``recipe``: QuantConfig fields that are not top-level
    keys of a run, then the recipe's own option fields."""
    from reparq.config import QuantConfig

    spec = _recipe_spec(recipe)
    quant = [n for n in QuantConfig.option_names() if n not in _TOP_LEVEL_QUANT_KEYS]
    return quant + ([f.name for f in dataclasses.fields(spec.options)] if spec.options else [])


# -- validation with one-line errors ----------------------------------------------------------

def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at ``loc`` (for listing its allowed keys)."""
    cls: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def _one_line(err: ValidationError, where: str) -> ReparqError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(owner.model_fields) if owner else "see the documentation"
        return ReparqError(f"{where}: config key {key!r} does not exist; allowed keys: {allowed}")
    msg = str(e.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if where == ARGUMENTS:  # flags and keyword arguments: the checks' own messages name them
        return ReparqError(msg)
    if not key:  # a model-level check (options) already names its key
        return ReparqError(f"{where}: {msg}")
    if e["type"] in ("int_parsing", "int_type", "int_from_float"):
        msg = f"must be an integer, got {e.get('input')!r}"
    return ReparqError(f"{where}: config key {key!r}: {msg}")


def validate(data: Any, where: str = "config") -> RunConfig:
    """A RunConfig from a mapping, or one ReparqError naming the bad key."""
    if not isinstance(data, dict):
        raise ReparqError(f"{where}: a config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, where) from None


def load_yaml(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ReparqError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ReparqError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return validate(data or {}, str(path))


# -- presets -----------------------------------------------------------------------------------

def list_presets(aliases: bool = True) -> list[str]:
    """Shipped preset names; with ``aliases``, also the family-free names (``w4a4``, ...)."""
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    if aliases:
        names += sorted({n.split("-", 1)[1] for n in names if n.split("-", 1)[0] in FAMILIES})
    return names


def load_preset(name: str, model: nn.Module | None = None) -> RunConfig:
    """A shipped preset by name; a family-free name needs the model to pick the family."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        if name in list_presets():
            if model is None:
                raise ReparqError(f"preset {name!r} picks its family from the model; name the family instead: "
                                  f"{', '.join(f'{f}-{name}' for f in FAMILIES)}")
            return load_preset(f"{detect_family(model)}-{name}")
        raise ReparqError(f"unknown preset {name!r}; allowed: {', '.join(list_presets())}")
    return load_yaml(path)


def resolve(config: Any, model: nn.Module | None = None) -> RunConfig:
    """A RunConfig from a preset name, a YAML path, a mapping or a RunConfig."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return validate(config)
    if isinstance(config, Path) or (isinstance(config, str) and config.endswith((".yaml", ".yml"))):
        return load_yaml(config)
    if isinstance(config, str):
        return load_preset(config, model)
    raise ReparqError(f"config must be a preset name, a YAML path, a mapping or a RunConfig, "
                      f"got {type(config).__name__}")


def detect_family(model: nn.Module) -> str:
    """``rep`` if the model has blocks that branch merging would merge, ``vit`` if it has
    LayerNorm or attention modules, else ``cnn``."""
    from reparq.recipes.plan import is_rep_block

    if any(is_rep_block(m) for m in model.modules()):
        return "rep"
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.MultiheadAttention)) or type(module).__name__.endswith("Attention"):
            return "vit"
    return "cnn"


def quantize_arguments(config: Any, model: nn.Module, explicit: dict) -> dict:
    """:func:`reparq.quantize`'s arguments: the config's values, overridden by the ``explicit``
    ones the caller passed (``None`` = not passed; options are merged key by key)."""
    run = resolve(config, model)
    options = dict(explicit.pop("options", {}) or {})
    changes = {k: v for k, v in explicit.items() if v is not None}
    batch_size = changes.pop("batch_size", None)
    recipe_changes = {k: changes[k] for k in ("recipe", "w_bits", "a_bits", "seed") if k in changes}
    for key in ("ignore", "overrides"):
        if key in options:
            recipe_changes[key] = list(options.pop(key)) if key == "ignore" else options.pop(key)
    run = run.updated(options=options, **recipe_changes)
    kwargs = run.quantize_kwargs()
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    return kwargs


# -- the command line ------------------------------------------------------------------------

DEFAULT_MODEL = "zoo:repvgg_fm"


def from_cli(config_file: str | None = None, preset: str | None = None, *, model: str | None = None,
             weights: str | None = None, recipe: str | None = None, w_bits: int | None = None,
             a_bits: int | None = None, seed: int | None = None, calib: str | None = None,
             calib_size: int | None = None, iters: int | None = None, blocks: str = "",
             w_group_size: int | None = None) -> RunConfig:
    """The run the flags describe: ``--config`` or ``--preset`` first, then each flag given on top.

    A family-free preset (``w4a4``) builds the model to pick its family.
    """
    if config_file and preset:
        raise ReparqError("give --config or --preset, not both")
    run = load_yaml(config_file) if config_file else RunConfig()
    source = model or run.model or DEFAULT_MODEL
    if preset:
        if preset not in list_presets():
            raise ReparqError(f"unknown preset {preset!r}; allowed: {', '.join(list_presets())}")
        family_model = None
        if not (PRESET_DIR / f"{preset}.yaml").is_file():
            from reparq.sources import load_model_source

            family_model = load_model_source(source, weights or run.weights)
        run = load_preset(preset, family_model)
    options: dict[str, Any] = {}
    if iters is not None:
        options["iters"] = iters
    globs = tuple(g.strip() for g in blocks.split(",") if g.strip())
    if globs:
        options["block_globs"] = globs
    final_recipe = recipe or run.recipe
    if options and _known_recipe(final_recipe) and _recipe_spec(final_recipe).options is None:
        raise ReparqError(f"--iters/--blocks apply to reconstruction recipes only, not {final_recipe}")
    if w_group_size is not None:  # a QuantConfig field: any recipe takes it
        options["w_group_size"] = w_group_size
    calib_changes = {k: v for k, v in (("source", calib), ("size", calib_size)) if v is not None}
    return run.updated(model=source, weights=weights, recipe=recipe, w_bits=w_bits, a_bits=a_bits, seed=seed,
                       calib=calib_changes, options=options)


def check_globs(run: RunConfig, model: nn.Module) -> None:
    """Fail (instead of the library's warning) when an override or ignore glob matches nothing:
    in a config file that is a typo, and the run would quietly use the wrong bits."""
    import copy
    import fnmatch

    from reparq.config import QuantConfig
    from reparq.recipes.insert import quantizable_layers
    from reparq.recipes.prepare import prepare_for_deployment

    if not run.overrides and not run.ignore:
        return
    deployed = copy.deepcopy(model).eval()
    prepare_for_deployment(deployed)
    modules = [n for n, _ in deployed.named_modules() if n]
    for pattern in run.ignore:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in modules):
            raise ReparqError(f"ignore pattern {pattern!r} matches no module; see the names with --dry-run")
    layers = quantizable_layers(deployed, QuantConfig())
    for pattern in run.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            example = layers[len(layers) // 2] if layers else "-"
            raise ReparqError(f"override pattern {pattern!r} matches no quantizable layer (names look like "
                              f"{example!r}; see them with --dry-run)")


def is_zoo_run(run: RunConfig) -> bool:
    """Zoo model and zoo data: the run can report top-1 accuracy on the zoo's test split."""
    from reparq.sources import model_kind

    zoo_model = model_kind(run.model or DEFAULT_MODEL)[0] == "zoo"
    return zoo_model and run.calib.source.removeprefix("zoo:") == "fashion_mnist"


def execute(run: RunConfig, reporter=None, save_dir: str | None = None, eval_size: int = 2000) -> dict:
    """Quantize any model the run names and compare it with its float self (the ``reparq quantize``
    path for models and data outside the zoo, where there are no labels to score against)."""
    from reparq.api import quantize
    from reparq.report.sqnr import compare_outputs
    from reparq.sources import evaluation_set, load_calibration, load_model_source, short_name

    model = load_model_source(run.model or DEFAULT_MODEL, run.weights)
    check_globs(run, model)
    calib = load_calibration(run.calib, model, run.model, seed=run.seed)
    inputs, labels, note = evaluation_set(run, calib, eval_size)
    qmodel = quantize(model, calib, config=run, reporter=reporter)
    scores = compare_outputs(model, qmodel, inputs, labels)
    if save_dir:  # only after everything succeeded
        from reparq.deploy.serialize import save

        save(qmodel, save_dir, source=run.model)
    info = qmodel.reparq_info
    return {"model": short_name(run.model), "source": run.model, "method": run.recipe, "w_bits": run.w_bits,
            "a_bits": run.a_bits,
            "metric": "top1" if labels is not None else "agreement", "fp": round(scores.fp_score, 2),
            "quant": round(scores.q_score, 2), "delta": round(scores.q_score - scores.fp_score, 2),
            "output_sqnr_db": round(scores.sqnr_db, 2),
            "calib_seconds": info.calib_seconds, "peak_mem_mb": info.peak_mem_mb, "seed": run.seed,
            "evaluated_on": note}
