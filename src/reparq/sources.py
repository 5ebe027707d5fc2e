"""Where models and calibration data come from, named by one string each.

Models: ``zoo:NAME`` (or a bare zoo name), ``timm:NAME`` built from a *local* weights file,
``hf:DIR`` (a Hugging Face model directory), ``package.module:function`` or
``path/to/file.py:function`` (a function returning an ``nn.Module``).

Calibration data: ``zoo:fashion_mnist``, ``images:DIR`` (an image folder, read with Pillow),
``text:FILE`` (lines of text, tokenized with the ``hf:DIR`` model's tokenizer), ``tensor:FILE``
(a safetensors file holding one tensor of inputs). In the Python API a ``forward_loop``
callable can stand in for all of them (:func:`record_forward_loop`).

Nothing here downloads: a source that would need the network is an error that says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from reparq.errors import ReparqError

MODEL_PREFIXES = ("zoo", "timm", "hf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ZOO_DATASETS = ("fashion_mnist",)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- models ------------------------------------------------------------------------------------

def short_name(source: str) -> str:
    """A source as a table shows it: ``zoo:NAME`` -> NAME, a path -> its last component."""
    kind, rest = model_kind(source)
    if kind == "zoo":
        return rest
    if kind == "hf":
        return f"hf:{Path(rest).name}"
    if kind == "callable":
        target, _, fn = source.rpartition(":")
        return f"{Path(target).name}:{fn}"
    return source


def model_kind(source: str) -> tuple[str, str]:
    """(kind, rest): kind is zoo, timm, hf or callable."""
    prefix, sep, rest = source.partition(":")
    if not sep:
        return "zoo", source
    if prefix in MODEL_PREFIXES:
        return prefix, rest
    return "callable", source


def load_model_source(source: str, weights: str | None = None) -> nn.Module:
    """Build the float model a source names, in eval mode."""
    if not source:
        raise ReparqError("no model given; name one as zoo:NAME, timm:NAME, hf:DIR or module:function")
    kind, rest = model_kind(source)
    if weights is not None and kind != "timm":
        raise ReparqError(f"--weights applies to timm:NAME models only, not {source!r}")
    if kind == "zoo":
        from reparq.zoo import load_model

        return load_model(rest)
    if kind == "timm":
        return _timm_model(rest, weights)
    if kind == "hf":
        return _hf_model(rest)
    return _callable_model(source)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ReparqError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled code, wrong format: one line says which
        raise ReparqError(f"cannot read weights file {path}: {_first_line(exc)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReparqError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _timm_model(name: str, weights: str | None) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        raise ReparqError(f"unknown timm model {name!r}; list them with timm.list_models()")
    if weights is None:
        raise ReparqError(f"timm:{name} needs a local weights file (--weights FILE / weights: FILE); "
                          "reparq never downloads")
    state = read_state_dict(weights)
    # Build with the class count and input channels the weights were trained with.
    cfg = get_pretrained_cfg(name)
    kwargs = {}
    classifier = (cfg.classifier if cfg else None) or "head.fc"
    first_conv = (cfg.first_conv if cfg else None) or ""
    head = state.get(f"{classifier}.weight")
    if head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    stem = state.get(f"{first_conv}.weight")
    if stem is not None and stem.ndim == 4:
        kwargs["in_chans"] = int(stem.shape[1])
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ReparqError(f"cannot build timm model {name!r}: {_first_line(exc)}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ReparqError(f"{weights} does not fit timm model {name!r}: "
                          f"{_first_line(exc).removeprefix('Error(s) in loading state_dict for ')}") from None
    if missing or unexpected:
        raise ReparqError(f"{weights} does not fit timm model {name!r}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.eval()


def _hf_model(directory: str) -> nn.Module:
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ReparqError(f"hf:{directory}: no Hugging Face model directory there (needs config.json)")
    try:
        import transformers
    except ImportError:
        raise ReparqError("hf: models need transformers: pip install 'reparq[transformers]'") from None
    from reparq.zoo.minilm import quiet_transformers

    try:
        with quiet_transformers():  # no load report or progress bar in the middle of our output
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            arch = (getattr(config, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            cls = cls or transformers.AutoModel
            model = cls.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    except Exception as exc:
        raise ReparqError(f"cannot build the model in {directory}: {_first_line(exc)}") from None
    return model.eval()


def _import_target(target: str):
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ReparqError(f"model file {path} not found")
        name = f"_reparq_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling-free type look-ups need it registered
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ReparqError(f"cannot import {path}: {_first_line(exc)}") from None
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ReparqError(f"cannot import module {target!r}: {_first_line(exc)}") from None


def _callable_model(source: str) -> nn.Module:
    target, _, attr = source.rpartition(":")
    if not target or not attr:
        raise ReparqError(f"model source {source!r}: write module:function or path/to/file.py:function")
    fn = getattr(_import_target(target), attr, None)
    if not callable(fn):
        raise ReparqError(f"{target} has no function {attr!r}")
    try:
        model = fn()
    except Exception as exc:
        raise ReparqError(f"{source}() failed to build the model: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ReparqError(f"{source}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


# -- calibration data --------------------------------------------------------------------------

def _subset(n_total: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:size]


def load_calibration(calib, model: nn.Module | None = None, model_source: str | None = None,
                     seed: int = 0) -> torch.Tensor:
    """Calibration inputs for a :class:`~reparq.runconfig.CalibSpec`: a tensor [N, ...]."""
    kind, sep, rest = calib.source.partition(":")
    if not sep:
        kind, rest = "zoo", calib.source
    if kind == "zoo":
        if rest not in ZOO_DATASETS:
            raise ReparqError(f"unknown zoo dataset {rest!r}; allowed: {', '.join(ZOO_DATASETS)}")
        from reparq.data import calibration_subset

        return calibration_subset(calib.size, seed=seed)
    if kind == "images":
        return load_image_folder(rest, calib.size, seed, **image_spec(calib, model, model_source))
    if kind == "text":
        src = model_source or ""
        if not src.startswith("hf:"):
            raise ReparqError("text: calibration data needs an hf:DIR model (its tokenizer reads the text)")
        return load_text(rest, src.removeprefix("hf:"), calib.size, calib.seq_len)
    if kind == "tensor":
        return load_tensor_file(rest, calib.size, seed)
    raise ReparqError(f"unknown calibration source {calib.source!r}; "
                      "use zoo:fashion_mnist, images:DIR, text:FILE or tensor:FILE")


def image_spec(calib, model: nn.Module | None, model_source: str | None) -> dict:
    """Channels, side length and normalization for an image folder: the config's values, else
    what the model was trained with (zoo: Fashion-MNIST; timm: its pretrained config)."""
    from reparq.data.fashion_mnist import MEAN, STD

    spec: dict[str, Any] = {}
    if (model_source or "").startswith("zoo:") or (model_source and ":" not in model_source):
        spec = {"channels": 1, "image_size": 28, "mean": [MEAN], "std": [STD]}
    elif model is not None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else None
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
        mean, std = cfg.get("mean"), cfg.get("std")
        spec = {"channels": channels, "image_size": size[-1] if size else None,
                "mean": list(mean) if mean and channels and len(mean) == channels else None,
                "std": list(std) if std and channels and len(std) == channels else None}
    for key in ("channels", "image_size", "mean", "std"):
        if getattr(calib, key) is not None:
            spec[key] = getattr(calib, key)
    if spec.get("channels") is None or spec.get("image_size") is None:
        raise ReparqError("images: calibration needs calib.channels and calib.image_size for this model")
    spec.setdefault("mean", None)
    spec.setdefault("std", None)
    return spec


def load_image_folder(directory: str, size: int, seed: int, channels: int, image_size: int,
                      mean: list[float] | None = None, std: list[float] | None = None) -> torch.Tensor:
    """A seeded subset of the images under ``directory`` (recursive), resized and normalized."""
    root = Path(directory)
    if not root.is_dir():
        raise ReparqError(f"image folder {root} not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReparqError(f"image folder {root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    try:
        from PIL import Image
    except ImportError:
        raise ReparqError("reading an image folder needs Pillow: pip install pillow") from None
    mean = torch.tensor(mean or [0.5] * channels).reshape(-1, 1, 1)
    std = torch.tensor(std or [0.5] * channels).reshape(-1, 1, 1)
    if mean.shape[0] != channels or std.shape[0] != channels:
        raise ReparqError(f"calib.mean and calib.std need {channels} values (one per channel)")
    out = []
    for i in _subset(len(files), size, seed).tolist():
        try:
            with Image.open(files[i]) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size),
                                                                          Image.Resampling.BILINEAR)
                arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except OSError as exc:
            raise ReparqError(f"cannot read image {files[i]}: {_first_line(exc)}") from None
        x = arr.reshape(image_size, image_size, -1).permute(2, 0, 1).float().div_(255.0)
        out.append((x - mean) / std)
    return torch.stack(out)


def load_text(path: str, tokenizer_dir: str, size: int, seq_len: int) -> torch.Tensor:
    """Token windows [N, seq_len] cut from the text file's token stream (no padding: every
    position is a real token, so no attention mask is needed while calibrating)."""
    file = Path(path)
    if not file.is_file():
        raise ReparqError(f"text file {file} not found")
    lines = [line.strip() for line in file.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise ReparqError(f"text file {file} is empty")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as exc:
        raise ReparqError(f"cannot load the tokenizer in {tokenizer_dir}: {_first_line(exc)}") from None
    stream = [t for line in lines for t in tok(line, add_special_tokens=False)["input_ids"]]
    # Each window framed the way the model saw text in training: [CLS] ... [SEP] (BERT), <s> ... </s>.
    first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    prefix, suffix = [first] if first is not None else [], [last] if last is not None else []
    body = seq_len - len(prefix) - len(suffix)
    windows = [stream[i:i + body] for i in range(0, len(stream), body)][:size]
    if len(windows) > 1 and len(windows[-1]) < body:
        windows.pop()  # a short tail would make the batch ragged
    return torch.tensor([prefix + w + suffix for w in windows], dtype=torch.long)


def load_tensor_file(path: str, size: int, seed: int) -> torch.Tensor:
    """The one tensor in a safetensors file (a seeded subset of ``size`` samples)."""
    file = Path(path)
    if not file.is_file():
        raise ReparqError(f"tensor file {file} not found")
    state = read_state_dict(file)
    if len(state) != 1:
        raise ReparqError(f"tensor file {file} must hold exactly one tensor, holds {len(state)}")
    x = next(iter(state.values()))
    if x.ndim == 0 or x.shape[0] == 0:
        raise ReparqError(f"tensor file {file} holds no samples")
    return x[_subset(x.shape[0], size, seed)].clone() if x.shape[0] > size else x


# -- the API's forward_loop --------------------------------------------------------------------

@torch.no_grad()
def record_forward_loop(model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> list[Any]:
    """Run the user's ``forward_loop(model)`` on the float model and keep every input it fed in.

    The reconstruction engine replays inputs block by block, so it needs them as batches; this is
    how a loop over the user's own data (as in ModelOpt's ``forward_loop``) becomes those batches.
    """
    if not callable(forward_loop):
        raise ReparqError(f"forward_loop must be a callable taking the model, got {type(forward_loop).__name__}")
    if not isinstance(model, nn.Module):
        raise ReparqError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batches: list[Any] = []

    def hook(module, args, kwargs):
        # One positional tensor (a vision model) or keyword tensors (an HF model's input_ids,
        # attention_mask...): the two batch forms reparq.quantize takes.
        named = {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and not named:
            batches.append(args[0].detach().clone())
        elif not args and named:
            batches.append(named)
        else:
            raise ReparqError("forward_loop must call the model with one tensor, model(x), or with keyword "
                              "tensors only, model(**batch)")

    was_training = model.training
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.eval()
        forward_loop(model)
    except ReparqError:
        raise
    except Exception as exc:
        raise ReparqError(f"forward_loop failed: {_first_line(exc)}") from None
    finally:
        handle.remove()
        model.train(was_training)
    if not batches:
        raise ReparqError("forward_loop never called the model; it must run the model over calibration data")
    return batches


def evaluation_set(run, calib: Any, size: int) -> tuple[Any, torch.Tensor | None, str]:
    """Inputs to compare float and quantized models on, their labels if known, and what they are.

    A zoo run uses the first ``size`` images of the zoo's *test* split (labels known, never seen in
    calibration); any other run falls back to the calibration inputs themselves (no labels).
    """
    from reparq.runconfig import is_zoo_run

    if is_zoo_run(run):
        from reparq.data import load_fashion_mnist

        x, y = load_fashion_mnist("test")
        return x[:size], y[:size], f"Fashion-MNIST test split, first {min(size, x.shape[0])} images"
    if isinstance(calib, torch.Tensor):
        return calib[:size], None, f"the {min(size, calib.shape[0])} first calibration inputs (no labels)"
    return list(calib), None, "the calibration batches (no labels)"
