"""Layer-streamed calibration of Hugging Face decoders (LLaMA layout, pre-LN OPT) stored as sharded
safetensors: peak memory is one decoder layer plus the cached hidden states, whatever the depth.

How it stays equal to the in-memory recipe (``reparq.quantize``; tested bit for bit):

- the whole model's decisions are made once on a meta-device copy (:func:`_plan`): bit widths
  (the first/last-layer rule), each activation observer's seed index, each unit's index (the
  reconstruction seeds) and whether any post-norm pair exists;
- each step holds its modules under their full-model names (:class:`Host`), so every pass of
  the recipe (quantizer insertion, ranges, post-norm fold, reconstruction, log2 conversion)
  runs unchanged on it;
- the hidden states that the in-memory recipe would feed each unit are kept as *streams*:
  ``stat`` (float, calibration batches: the statistics passes), and per reconstruction phase the
  float and quantized inputs, both as the chain that block reconstruction propagates
  (``fp``/``qc`` for RepQuant's clipping phase, ``fp2``/``qf`` for its weight phase) and as full
  forwards in calibration batches (``qc_cal``, ``fp2_cal``, ``qf_cal``), which is what the head
  (final norm + ``lm_head``, not chained to the last layer) is calibrated on.

Streams live in memory or, above ``cache_threshold_mb``, in the reconstruction's disk caches;
after every step they are saved with the progress (:mod:`reparq.stream.state`) so that a rerun
resumes. Under ``torchrun`` the calibration batches are split over ranks
(:mod:`reparq.parallel`).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from reparq import parallel
from reparq.errors import ReparqError
from reparq.eval.measure import measure
from reparq.model.attention_adapters import adapt_attention, describe_attention
from reparq.model.blocks import Unit, discover_units
from reparq.nn.qmodules import quantized_layers
from reparq.progress import SILENT, Reporter
from reparq.quant.log_reparam import convert_logsqrt2_to_log2
from reparq.recipes.block_recon import recon_config
from reparq.recipes.calibrate import activation_quantizers, set_quant_enabled
from reparq.recipes.insert import insert_quantizers
from reparq.recipes.reconstruct import _first, _set_units_quant, reconstruct_unit
from reparq.recipes.reparam import reparam_groups
from reparq.recipes.repqvit import fold_and_reinit, prepare_transformer, producer_fold_for
from reparq.recipes.repquant import clip_iters_for, drop_prob_for, gptq_for
from reparq.stream.checkpoint import LazyCheckpoint
from reparq.stream.skeleton import (build_skeleton, decoder_layers, final_norm, first_layer_inputs, free, load_config,
                                    materialize, outer_modules, state_names)
from reparq.stream.state import StreamState, fingerprint

STREAMABLE = ("repqvit", "repquant")
PARTS_DIR = "parts"


class Host(nn.Module):
    """Some of a model's submodules under their full names (``model.layers.3``), run by ``fn`` on
    ``device``. The recipe's passes build quantizers from statistics held on the CPU (observers,
    per-channel rows, the probabilities' samples), so before each run the host moves whatever it
    holds to its device (a no-op for what is already there), and its input with it: the cached
    hidden states stay on the CPU. No default-device context: that would also send the passes'
    CPU-side bookkeeping (observer pools, seeded index draws) to the GPU."""

    def __init__(self, parts: dict[str, nn.Module], fn: Callable[["Host", torch.Tensor], torch.Tensor],
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        for name, module in parts.items():
            parent: nn.Module = self
            *path, last = name.split(".")
            for comp in path:
                if comp not in parent._modules:
                    parent.add_module(comp, nn.Module())
                parent = parent._modules[comp]
            parent.add_module(last, module)
        self._fn = fn
        self.device = torch.device(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.to(self.device)
        return self._fn(self, x.to(self.device))


@dataclass
class Plan:
    """Whole-model decisions, made on the meta-device skeleton."""

    bits: dict[str, tuple[int, int]]
    observer_index: dict[str, int]
    unit_index: dict[str, int]
    unit_stage: dict[str, str | None]
    any_pairs: bool


def _plan(skeleton: nn.Module, config, options) -> Plan:
    q = copy.deepcopy(skeleton)
    bits = insert_quantizers(q, config)
    adapt_attention(q, config.a_bits, probs="logsqrt2" if options.probs == "auto" else options.probs,
                    ignore=config.ignore)
    units = discover_units(q)  # decoder layers, then lm_head: execution order
    pairs = reparam_groups(q, norms=options.reparam, consumer_fold=getattr(options, "consumer_fold", False),
                           producer_fold=producer_fold_for(options))
    return Plan(bits, {n: i for i, (n, _) in enumerate(activation_quantizers(q))},
                {u.name: k for k, u in enumerate(units)}, {u.name: u.stage for u in units}, bool(pairs))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap(threshold_bytes: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold_bytes`` or more from its own mapping, returned to the
    OS when freed. glibc otherwise raises its mmap threshold to the size of the tensors freed (up
    to 32 MB), serves the next ones from the heap, and the heap's holes make resident memory grow
    step after step while little is live (measured: 1 layer + head of a 1.1B LLaMA under repquant,
    3.7 GB peak without, 2.8 GB with). The price: every mapped allocation costs fresh page faults,
    so a small model whose activations are a few MB calibrates up to about 2x slower (measured on
    a 2-layer, 512-wide LLaMA: 57 s vs 33 s; a 4 MB threshold gave 25 s but 2.9 GB on the 1.1B
    layer). Process-wide and left in place; a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold_bytes)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Free this step's tensors before the next layer loads: collect module reference cycles, then
    hand freed heap pages back to the OS. Without ``malloc_trim`` glibc keeps them (its mmap
    threshold grows to the size of freed tensors, so later ones come from the heap), and the
    process's resident memory would grow by about a layer per layer although nothing is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@dataclass
class StreamResult:
    out_dir: Path
    steps: int
    resumed_at: int
    calib_seconds: float
    peak_mem_mb: float
    recon_stats: list = field(default_factory=list)


@torch.no_grad()
def _run_batches(module: nn.Module, batches: list[torch.Tensor], device) -> list[torch.Tensor]:
    return [module(b.to(device)).cpu() for b in batches]


def _layer_fn(name: str, args: tuple, kwargs: dict):
    def fn(host: Host, x: torch.Tensor) -> torch.Tensor:
        return _first(host.get_submodule(name)(x, *args, **kwargs))
    return fn


def _head_fn(norm_name: str, head_name: str):
    def fn(host: Host, x: torch.Tensor) -> torch.Tensor:
        return host.get_submodule(head_name)(host.get_submodule(norm_name)(x))
    return fn


def _phases(recipe: str, options, plan: Plan, w_bits: int, a_bits: int) -> list[tuple[str, object, int]]:
    """(phase name, ReconConfig, seed offset) as the in-memory recipe runs them."""
    if recipe != "repquant":
        return []
    phases = []
    # The in-memory recipe's own "auto" choices, for a pre-norm model: streamed models are decoders.
    clip_iters = clip_iters_for(options, post_ln=False)
    if plan.any_pairs and clip_iters > 0:
        phases.append(("clip", recon_config(options, iters=clip_iters, round_weights=False,
                                            learn_act_scale=False, drop_prob=0.0), 0))
    gptq = gptq_for(options, False, w_bits, a_bits)
    if options.iters > 0 or gptq:
        drop_prob = drop_prob_for(options, image_inputs=False, a_bits=a_bits)  # decoders read token ids
        phases.append(("weights", recon_config(options, gptq=gptq, drop_prob=drop_prob), 1))
    return phases


_PHASE_STREAMS = {"clip": ("fp", "qc", "stat", "qc_cal"), "weights": ("fp2", "qf", "fp2_cal", "qf_cal")}


def quantize_streamed(model_dir: str | Path, calib_ids: torch.Tensor, out_dir: str | Path, recipe: str = "repqvit",
                      w_bits: int = 8, a_bits: int = 8, seed: int = 0, batch_size: int = 8, device: str = "cpu",
                      work_dir: str | Path | None = None, restart: bool = False, reporter: Reporter = SILENT,
                      on_step_done: Callable[[int], None] | None = None, **options) -> StreamResult:
    """Quantize the causal LM in ``model_dir`` (config.json + safetensors, sharded or not) one
    decoder layer at a time; write a model that :func:`reparq.load` reads to ``out_dir``.

    ``calib_ids``: token ids ``[N, T]`` (fixed-length windows, no padding). Resumes from the state
    in ``work_dir`` (default ``out_dir/.stream-state``) unless ``restart``. ``on_step_done(step)``
    is called after each saved step (tests use it to interrupt a run).
    """
    from reparq.api import resolve_recipe
    from reparq.info import QuantInfo
    from reparq.model.hf_adapters import LLAMA_LAYOUT, hf_family, register_hf_attention

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ReparqError(f"device {device!r} requested but no CUDA device is visible")
    if recipe not in STREAMABLE:
        raise ReparqError(f"streamed calibration supports the recipes {', '.join(STREAMABLE)}, not {recipe!r}")
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.ndim != 2 or calib_ids.dtype not in (torch.long, torch.int):
        raise ReparqError("calib_ids must be a [samples, tokens] tensor of token ids")
    _, config, opts = resolve_recipe(recipe, w_bits, a_bits, options)
    register_hf_attention()
    bound_heap()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf_config = load_config(model_dir)
    skeleton = build_skeleton(hf_config)
    layers_name, layers, norm_name = _check_streamable(skeleton, hf_config, hf_family(skeleton), LLAMA_LAYOUT)
    checkpoint = LazyCheckpoint(model_dir)
    plan = _plan(skeleton, config, opts)
    phases = _phases(recipe, opts, plan, w_bits, a_bits)
    n_layers = len(layers)
    dp = parallel.current()
    batches = list(calib_ids.long().split(batch_size))
    local = dp.shard(batches) if dp is not None else batches
    if dp is not None:
        dp.set_local_count(sum(len(b) for b in local))
    rank_dir = f"rank{dp.rank}" if dp is not None else "."
    state = StreamState(Path(work_dir or out_dir / ".stream-state") / rank_dir, fingerprint(
        model=str(model_dir.resolve()), index=sorted(checkpoint.weight_map.items()), ids=calib_ids, recipe=recipe,
        bits=[w_bits, a_bits], seed=seed, batch_size=batch_size, options=options, world=dp.world if dp else 1))
    if restart:
        state.clear()
    start = state.next_step()
    writer = dp is None or dp.rank == 0
    parts = out_dir / PARTS_DIR
    embed_name = next(n for n, m in skeleton.named_modules() if isinstance(m, nn.Embedding))
    tied = "lm_head.weight" not in checkpoint
    result = StreamResult(out_dir, n_layers + 1, start, 0.0, 0.0)
    with measure() as m:
        # The first layer's non-hidden arguments on the first batch: what the in-memory engine replays.
        hidden, args, kwargs = _embed(skeleton, layers, checkpoint, [batches[0]] + (local if start == 0 else []), device)
        if start == 0:
            streams = {"stat": hidden[1:]}
            for phase, _, _ in phases:
                for s in _PHASE_STREAMS[phase]:
                    streams[s] = streams["stat"]
        else:
            streams = state.load_streams()
        for step in range(start, n_layers + 1):
            is_head = step == n_layers
            if is_head:
                host, unit_name, norm = _head_host(skeleton, norm_name, embed_name, checkpoint, device, tied)
                streams = _run_step(host, unit_name, streams, phases, config, opts, plan, seed, reporter,
                                    (), {}, device, head_norm=norm)
            else:
                name = f"{layers_name}.{step}"
                layer = materialize(layers[step], name, checkpoint, device)
                host = Host({name: layer}, _layer_fn(name, args, kwargs), device)
                reporter.stage(f"layer {step + 1}/{n_layers}", total=max(1, sum(c.iters for _, c, _ in phases)))
                streams = _run_step(host, name, streams, phases, config, opts, plan, seed, reporter,
                                    args, kwargs, device)
            result.recon_stats += getattr(host, "reparq_recon_stats", [])
            if writer:
                _write_part(host, parts, f"step-{step:05d}")
            if is_head:
                streams = {}
            else:
                free(layers[step])
            del host
            release_memory()
            state.save(step + 1, streams)
            if on_step_done is not None:
                on_step_done(step)
    result.calib_seconds, result.peak_mem_mb = round(m.seconds, 2), m.peak_mem_mb
    if writer:
        info = QuantInfo(recipe=recipe, config=config.to_dict(), seed=seed, calib_samples=int(calib_ids.shape[0]),
                         calib_seconds=result.calib_seconds, peak_mem_mb=result.peak_mem_mb,
                         extra={"streamed": True, "resumed_at_step": start, "world_size": dp.world if dp else 1})
        _finish(out_dir, parts, n_layers, info, type(skeleton).__name__, f"hf:{model_dir.resolve()}", checkpoint,
                _carried(skeleton, layers, (norm_name, embed_name) if tied else (norm_name,)))
    return result


def _embed(skeleton: nn.Module, layers: nn.ModuleList, checkpoint: LazyCheckpoint, batches: list[torch.Tensor],
           device) -> tuple[list[torch.Tensor], tuple, dict]:
    """The first layer's float inputs on each batch (on the CPU), and its further arguments on the
    first: the modules around the layers get their weights for this pass only."""
    outer = outer_modules(skeleton, layers)
    for name, module in outer.items():
        materialize(module, name, checkpoint, "cpu", recurse=False)
    hidden, args, kwargs = [], (), {}
    for k, batch in enumerate(batches):
        h, a, kw = first_layer_inputs(skeleton, layers, batch, device)
        hidden.append(h.float())
        if k == 0:
            args, kwargs = a, kw
    for module in outer.values():
        free(module, recurse=False)
    return hidden, args, kwargs


def _head_host(skeleton: nn.Module, norm_name: str, embed_name: str, checkpoint: LazyCheckpoint, device,
               tied: bool) -> tuple[Host, str, nn.Module]:
    """(host of final norm + lm_head, the unit's name, the norm)."""
    head_name = "lm_head"
    norm = materialize(skeleton.get_submodule(norm_name), norm_name, checkpoint, device)
    head = skeleton.get_submodule(head_name)
    if tied:  # tied output layer: its own, real copy of the embedding matrix (the skeleton shares one meta tensor)
        head = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    head = materialize(head, head_name, checkpoint, device, aliases={f"{head_name}.weight": f"{embed_name}.weight"})
    return Host({norm_name: norm, head_name: head}, _head_fn(norm_name, head_name), device), head_name, norm


def _run_step(host: Host, unit_name: str, streams: dict, phases, config, opts, plan: Plan, seed: int,
              reporter: Reporter, args: tuple, kwargs: dict, device, head_norm: nn.Module | None = None) -> dict:
    """One decoder layer (or, with ``head_norm``, the head) through the recipe; returns the streams
    after it."""
    head = head_norm is not None
    pairs = prepare_transformer(host, streams["stat"], config, opts, seed, SILENT,
                                learnable_clip=any(p == "clip" for p, _, _ in phases), clip_lr=getattr(opts, "clip_lr", 1e-3),
                                bits=plan.bits, observer_index=plan.observer_index)
    host.to(device)  # the unit is trained below without going through the host (see Host)
    unit = Unit(unit_name, "layer" if head else "block", plan.unit_stage.get(unit_name),
                [n for n, _ in quantized_layers(host)])
    k = plan.unit_index[unit_name]
    out: dict[str, list[torch.Tensor]] = {}
    set_quant_enabled(host, weights=False, inputs=False)
    out["stat"] = _run_batches(host, streams["stat"], device)
    stats = []
    for phase, cfg, seed_offset in phases:
        fp_chain, q_chain, fp_cal, q_cal = _PHASE_STREAMS[phase]
        if phase == "weights":
            fold_and_reinit(host, pairs, config, opts)
            host.to(device)
            pairs = []
        _set_units_quant(host, [unit], False)
        fp_in, q_in = (streams[fp_cal], streams[q_cal]) if head else (streams[fp_chain], streams[q_chain])
        if head:  # lm_head reads the final norm's output
            fp_in, q_in = _run_batches(head_norm, fp_in, device), _run_batches(head_norm, q_in, device)
        stat, out[fp_chain], out[q_chain] = reconstruct_unit(host, unit, fp_in, q_in, args, kwargs, cfg,
                                                             (seed + seed_offset) * 1000 + k, reporter)
        stats.append({**stat, "unit": f"{unit_name}:clip" if phase == "clip" else unit_name})
        # Full forwards in calibration batches of this phase's finished state (float: weights as
        # they now are, quantizers off), for units that are not chained (the head).
        _set_units_quant(host, [unit], False)
        if phase == "weights":
            out[fp_cal] = _run_batches(host, streams[fp_cal], device)
        _set_units_quant(host, [unit], True)
        out[q_cal] = _run_batches(host, streams[q_cal], device)
    if pairs:
        fold_and_reinit(host, pairs, config, opts)
        host.to(device)
    set_quant_enabled(host, weights=True, inputs=True)
    if opts.to_log2:
        convert_logsqrt2_to_log2(host)
    host.reparq_recon_stats = stats
    return out


def _write_part(host: Host, parts: Path, stem: str) -> None:
    from safetensors.torch import save_file

    from reparq.deploy.serialize import export_state

    layers, tensors = export_state(host)  # a tied input embedding is stored as the output layer's integers
    parts.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(parts / f"{stem}.safetensors"))
    (parts / f"{stem}.json").write_text(json.dumps({"layers": layers, "attention": describe_attention(host)}, indent=1))


def _check_streamable(skeleton: nn.Module, hf_config, family: str | None,
                      llama_layout: tuple[str, ...]) -> tuple[str, nn.ModuleList, str]:
    """(name, list) of the decoder layers and the final norm's name (:func:`final_norm`), once the
    model is known to stream: each step runs one
    layer on the hidden states, so nothing outside the layers but embeddings and the final norm
    may hold weights (OPT-350m's ``project_in``/``project_out`` would be quantized layers there,
    and it is post-LN, which the streamed recipe's pre-norm choices do not cover)."""
    families = ", ".join(llama_layout)
    if family not in (*llama_layout, "opt"):
        raise ReparqError(f"streamed calibration supports decoders with LLaMA's layer layout ({families}) and "
                          f"pre-LN OPT, not {type(skeleton).__name__}")
    if not getattr(hf_config, "do_layer_norm_before", True):
        raise ReparqError("streamed calibration supports pre-LN OPT only (this config has do_layer_norm_before=False);"
                          " quantize it in memory with reparq.quantize")
    layers_name, layers = decoder_layers(skeleton)
    extra = [n for n, m in outer_modules(skeleton, layers).items() if isinstance(m, nn.Linear)]
    if extra:
        raise ReparqError(f"streamed calibration runs one decoder layer at a time; {', '.join(extra)} outside the "
                          f"layers would be left unquantized: quantize this model in memory with reparq.quantize")
    return layers_name, layers, final_norm(skeleton, layers)  # raises if there is none


def _carried(skeleton: nn.Module, layers: nn.ModuleList, written: tuple[str, ...]) -> list[str]:
    """Checkpoint tensors the quantized model needs that no step writes: those of the modules
    outside the layers but the ``written`` ones (the final norm, which the head step writes; a tied
    token embedding, stored as the output layer's integers), copied over as they are: the token
    embedding of an untied model, OPT's learned positions."""
    return [full for name, module in outer_modules(skeleton, layers).items() if name not in written
            for full in state_names(module, name, recurse=False)]


def _finish(out_dir: Path, parts: Path, n_layers: int, info, architecture: str, source: str,
            checkpoint: LazyCheckpoint, carried: list[str]) -> None:
    """``reparq.json`` over all parts, with the ``carried`` checkpoint tensors (:func:`_carried`)."""
    from safetensors.torch import save_file

    from reparq.deploy.serialize import write_meta

    layers, attention, shards = {}, {}, []
    for step in range(n_layers + 1):
        meta = json.loads((parts / f"step-{step:05d}.json").read_text())
        layers.update(meta["layers"])
        attention.update(meta["attention"])
        shards.append(f"{PARTS_DIR}/step-{step:05d}.safetensors")
    if carried:
        save_file({k: v.float() for k, v in checkpoint.load(set(carried)).items()}, str(parts / "embedding.safetensors"))
        shards.append(f"{PARTS_DIR}/embedding.safetensors")
    write_meta(out_dir, info, layers, attention, architecture, source, shards=shards)


__all__ = ["Host", "STREAMABLE", "StreamResult", "quantize_streamed"]
