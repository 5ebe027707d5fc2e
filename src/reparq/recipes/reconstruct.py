"""Block reconstruction engine (AdaRound / BRECQ / QDrop, and the base of RepAPQ's ABC).

Units (blocks, or lone layers) are calibrated one at a time in execution order:

1. the unit's float input and the input produced by the already-quantized prefix are
   cached once (a prefix forward with early exit; when the unit directly consumes the
   previous unit's output, that output is reused instead: no prefix pass at all);
2. its learnable quantization parameters (AdaRound rounding, LSQ activation step sizes) are
   optimized against a loss on the unit's output vs the float output;
3. rounding is made hard, weights are written onto the grid, and the cached quantized input
   is pushed through the finished unit to feed the next one.

Memory is one unit plus its cached inputs/outputs; caches go to disk above a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from reparq import parallel
from reparq.errors import ReparqError
from reparq.model.blocks import Unit
from reparq.nn.attention import MatmulQuantizers
from reparq.nn.qmodules import QuantizedLayer
from reparq.progress import SILENT, Reporter
from reparq.quant.adaround import AdaRound, beta_schedule
from reparq.recipes.cache import TensorCache, samples_within
from reparq.recipes.calibrate import forward_batch


@dataclass
class ReconConfig:
    iters: int = 300
    recon_batch_size: int = 32
    loss_p: float = 2.0  # 2: squared error (BRECQ), 1: absolute error (RepAPQ)
    block_weight: float = 1.0  # weight of the unit-output term (0 leaves only extra terms, e.g. ABC's stage loss)
    round_weights: bool = True  # AdaRound
    learn_act_scale: bool = True  # LSQ step sizes for activation quantizers inside the unit
    drop_prob: float = 0.0  # QDrop: probability of keeping an activation in float, element-wise
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    lr_affine: float = 1e-3  # QPRep's per-channel gain and shift, when a layer carries them
    reg_weight: float = 0.01
    warmup: float = 0.2
    # GPTQ (reparq.quant.gptq): round each unit's Linear weights on their quantized inputs before the
    # unit learns; AdaRound then only handles the layers GPTQ does not (convolutions).
    gptq: bool = False
    gptq_damp: float = 0.01  # fraction of the Hessian's mean diagonal added to it
    gptq_float_target: bool = False  # match the float model's layer outputs, not W on the quantized inputs
    cache_threshold_mb: float = 512.0
    cache_dir: str | None = None
    # A training step's samples go through the unit in slices of at most this many MB of output,
    # gradients summed: the step is the same, while a language model's head (logits of a 30k
    # vocabulary are 15 MB per 128-token sample) no longer holds a whole minibatch of them, their
    # targets, differences and gradients at once.
    micro_batch_mb: float = 128.0


class _StopForward(Exception):
    pass


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def unit_layers(model: nn.Module, unit: Unit) -> list[QuantizedLayer]:
    return [model.get_submodule(n) for n in unit.layers]


def _set_units_quant(model: nn.Module, units: list[Unit], enabled: bool) -> None:
    for u in units:
        for layer in unit_layers(model, u):
            layer.set_quant_enabled(enabled, enabled)
        for m in model.get_submodule(u.name).modules():  # attention matmul inputs inside the unit
            if isinstance(m, MatmulQuantizers):
                m.set_enabled(enabled)


def unit_act_quantizers(module: nn.Module, layers: list[QuantizedLayer]) -> list[nn.Module]:
    """The unit's data-ranged activation quantizers: layer inputs, then attention matmul inputs."""
    found = [layer.input_quantizer for layer in layers]
    found += [q for m in module.modules() if isinstance(m, MatmulQuantizers) for _, q in m.uniform_quantizers()]
    return [q for q in found if not q.is_float]


def without_caches(kwargs: dict) -> dict:
    """A decoder's KV cache (transformers ``Cache``) must not be replayed: every replay would
    append to it. Units run without one."""
    return {k: None if type(v).__name__.endswith("Cache") else v for k, v in kwargs.items()}


@dataclass
class UnitCall:
    """How a unit was called in a traced forward: its order, whether its first input is the
    previous unit's output as is, and its other arguments."""

    order: int
    chained: bool
    args: tuple
    kwargs: dict


@torch.no_grad()
def trace_units(model: nn.Module, units: list[Unit], batch: torch.Tensor) -> tuple[list[Unit], list[bool], dict]:
    """Units in execution order; for each, whether it consumes the previous unit's output as is;
    and each unit's call (its non-first arguments are replayed when the unit runs on cached inputs,
    so they must not depend on the samples: true of CNN/ViT blocks, and of masks shared by a batch)."""
    # Only the latest unit's output is held (a tensor, not its id, which Python reuses once the
    # tensor is freed): every unit's output on a whole batch would be a language model's logits
    # kept through the entire reconstruction.
    calls: dict[str, UnitCall] = {}
    latest: list[torch.Tensor | None] = [None]
    hooks = []
    for u in units:
        def hook(mod, args, kwargs, out, name=u.name):
            if name not in calls and args:
                calls[name] = UnitCall(len(calls), args[0] is latest[0], args[1:], without_caches(kwargs))
                latest[0] = _first(out)
        hooks.append(model.get_submodule(u.name).register_forward_hook(hook, with_kwargs=True))
    try:
        forward_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
        latest.clear()
    ordered = sorted((u for u in units if u.name in calls), key=lambda u: calls[u.name].order)
    chained = [False] + [calls[u.name].chained for u in ordered[1:]]
    return ordered, chained, calls


@torch.no_grad()
def capture_inputs(model: nn.Module, unit: Unit, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The unit's first positional input for every batch (the forward stops right there)."""
    module = model.get_submodule(unit.name)
    inputs: list[torch.Tensor] = []

    def hook(mod, args):
        inputs.append(args[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for b in batches:
            try:
                forward_batch(model, b)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """Sum over features, mean over samples (the BRECQ convention the regularizer weight assumes)."""
    return (pred - target).abs().pow(p).flatten(1).sum(1).mean()


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its first parameter's device, else its first buffer's (a log
    quantizer holds only a buffer), else the CPU."""
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def run_unit(module: nn.Module, cache: TensorCache, args: tuple, kwargs: dict, batch_size: int,
             budget_mb: float | None = None) -> Iterator[torch.Tensor]:
    """The unit's outputs on every cached input, batch by batch, on the CPU (caches live there;
    the unit may run on a GPU). With ``budget_mb``, a one-sample probe sizes the batches so that
    none holds more output than that (a language model's logits); smaller outputs keep
    ``batch_size``."""
    dev = module_device(module)
    with torch.no_grad():
        if budget_mb is not None and len(cache):
            probe = _first(module(cache.take(torch.arange(1)).to(dev), *args, **kwargs))
            batch_size = samples_within(budget_mb, probe[0].numel(), most=batch_size)
            del probe
        for x in cache.batches(batch_size):
            yield _first(module(x.to(dev), *args, **kwargs)).detach().cpu()


class UnitTrainer:
    """Learns one unit's rounding and activation scales; ``extra_loss`` lets recipes add terms (ABC)."""

    def __init__(self, model: nn.Module, unit: Unit, cfg: ReconConfig, seed: int,
                 fixed_weights: frozenset[str] = frozenset()) -> None:
        self.model, self.unit, self.cfg = model, unit, cfg
        self.fixed_weights = fixed_weights  # layers whose weights are already on the grid (GPTQ)
        self.module = model.get_submodule(unit.name)
        self.layers = unit_layers(model, unit)
        self.gen = torch.Generator().manual_seed(seed)
        self.roundings: list[AdaRound] = []

    def _setup(self) -> torch.optim.Optimizer | None:
        # Freeze everything first; only what is switched on below (rounding, step sizes) learns.
        for p in self.module.parameters():
            p.requires_grad_(False)
        groups = []
        if self.cfg.round_weights:
            for name, layer in zip(self.unit.layers, self.layers):
                wq = layer.weight_quantizer
                if not wq.is_float and name not in self.fixed_weights:
                    r = AdaRound(wq, layer.weight)
                    layer.__dict__["_rounding"] = r
                    self.roundings.append(r)
            if self.roundings:
                groups.append({"params": [p for r in self.roundings for p in r.parameters()], "lr": self.cfg.lr_round})
        act_scales = []
        self.act_quantizers = unit_act_quantizers(self.module, self.layers)
        for aq in self.act_quantizers:
            aq.drop_prob = self.cfg.drop_prob
            aq.drop_generator = self.gen
            if self.cfg.learn_act_scale:
                aq.scale.requires_grad_(True)
                act_scales.append(aq.scale)
        if act_scales:
            groups.append({"params": act_scales, "lr": self.cfg.lr_act})
        for group in self._module_param_groups():
            for p in group["params"]:
                p.requires_grad_(True)
            groups.append(group)
        affines = [p for layer in self.layers if "output_affine" in layer._modules
                   for p in layer._modules["output_affine"].parameters()]
        for p in affines:
            p.requires_grad_(True)
        if affines:
            groups.append({"params": affines, "lr": self.cfg.lr_affine})
        return torch.optim.Adam(groups) if groups else None

    def _module_param_groups(self) -> list[dict]:
        """Optimizer groups of modules that bring their own learnable state (RepQuant's per-channel
        clipping bounds), declared with ``recon_param_groups()``."""
        return [group for m in self.module.modules() if callable(getattr(m, "recon_param_groups", None))
                for group in m.recon_param_groups()]

    def train(self, q_in: TensorCache, fp_in: TensorCache, fp_out: TensorCache, args: tuple, kwargs: dict,
              reporter: Reporter, extra_loss=None) -> dict:
        opt = self._setup()
        history = []
        cfg = self.cfg
        dp = parallel.current()
        dev = module_device(self.module)
        n = dp.total() if dp is not None else len(q_in)  # global sample count under data parallelism
        if opt is not None and cfg.iters > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters)
            params = [p for group in opt.param_groups for p in group["params"]]
            for step in range(cfg.iters):
                # Every rank draws the same global minibatch and works on the samples it holds.
                idx = torch.randint(0, n, (min(cfg.recon_batch_size, n),), generator=self.gen, device="cpu")
                mine, local = dp.local(idx) if dp is not None else (None, idx)
                x = q_in.take(local)
                if cfg.drop_prob > 0:  # QDrop also mixes the unit's input between quantized and float
                    keep = torch.rand((len(idx), *x.shape[1:]), generator=self.gen, device="cpu") < cfg.drop_prob
                    x = torch.where(keep if mine is None else keep[mine], fp_in.take(local), x)
                opt.zero_grad(set_to_none=True)
                rec = torch.zeros((), device=dev)
                per = samples_within(cfg.micro_batch_mb, math.prod(fp_out.shape[1:]))
                for start in range(0, len(local), per):  # one slice unless the outputs are large
                    part = local[start:start + per]
                    out = _first(self.module(x[start:start + per].to(dev), *args, **kwargs))
                    # Sum over this rank's samples / global minibatch size: summed over ranks, the mean.
                    part_rec = lp_loss(out, fp_out.take(part).to(dev), cfg.loss_p) * (len(part) / len(idx))
                    loss = cfg.block_weight * part_rec
                    if extra_loss is not None:  # a mean over the samples it is given, like lp_loss
                        loss = loss + extra_loss(out, part) * (len(part) / len(local))
                    if loss.requires_grad:
                        loss.backward()
                    rec = rec + part_rec.detach()
                    del out, loss
                beta = beta_schedule(step, cfg.iters, cfg.warmup)
                if beta is not None and (dp is None or dp.rank == 0):
                    # The rounding regularizer's gradient goes straight into V.grad (see AdaRound).
                    for r in self.roundings:
                        r.add_regularizer_grad(beta, cfg.reg_weight)
                parallel.all_reduce_grads(params)
                rec = parallel.all_reduce_(rec.detach().clone())
                opt.step()
                sched.step()
                for aq in self.act_quantizers:  # keep learned step sizes valid
                    with torch.no_grad():
                        aq.scale.clamp_(min=1e-8)
                history.append(rec.item())
                reporter.advance(1, info=f"{self.unit.name} loss {history[-1]:.4g}")
        else:
            reporter.advance(cfg.iters)
        self._finish()
        return {"unit": self.unit.name, "loss_first": history[0] if history else None,
                "loss_last": history[-1] if history else None, "history": history}

    @torch.no_grad()
    def _finish(self) -> None:
        """Hard rounding, weights written onto the grid, learnable state removed."""
        for aq in getattr(self, "act_quantizers", []):
            aq.drop_prob, aq.drop_generator = 0.0, None
            aq.scale.requires_grad_(False)
        for group in self._module_param_groups():
            for p in group["params"]:
                p.requires_grad_(False)
        for layer in self.layers:
            r = layer.__dict__.pop("_rounding", None)
            if r is not None:
                r.hard = True
                layer.weight.data.copy_(r(layer.weight))
            if "output_affine" in layer._modules:
                layer._modules["output_affine"].requires_grad_(False)


PACK_HINT = ("pack text into fixed-length sequences without padding (reparq.data.text.token_windows for a token "
             "stream, reparq.zoo.minilm.pack_sentences for sentences)")


def check_replayable(batches: list) -> None:
    """Units are trained on cached inputs and replayed with the *first* batch's other arguments
    (masks, positions), so every batch must have one shape beyond the sample dimension and carry
    no padding: a padded batch's mask is per sample, and replaying one batch's mask for all would
    quietly train on wrong attention. Raises a ReparqError that says what to do."""
    def main_input(b):
        if isinstance(b, dict):
            return b["input_ids"] if "input_ids" in b else next(v for v in b.values() if isinstance(v, torch.Tensor))
        return b
    shapes = sorted({tuple(main_input(b).shape[1:]) for b in batches})
    if len(shapes) > 1:
        raise ReparqError(f"block reconstruction needs calibration batches of one shape beyond the batch dimension "
                          f"(got {shapes[:4]}): {PACK_HINT}")
    if any(isinstance(b, dict) and "attention_mask" in b and bool((b["attention_mask"] == 0).any()) for b in batches):
        raise ReparqError(f"block reconstruction cannot use padded calibration batches (units are replayed with one "
                          f"batch's attention mask): {PACK_HINT}")


def reconstruct(model: nn.Module, units: list[Unit], batches: list[torch.Tensor], cfg: ReconConfig, seed: int = 0,
                reporter: Reporter = SILENT, make_extra_loss=None) -> list[dict]:
    """Reconstruct every unit in execution order; the model's quantizers must already be initialized.

    ``make_extra_loss(model, unit, k, ordered, fp_out_cache, args, kwargs)`` may return a
    function ``(unit_output, sample_idx) -> loss`` added to the unit's loss (RepAPQ's
    across-block calibration uses it for the stage-output term).
    """
    check_replayable(batches)
    model.eval()
    _set_units_quant(model, units, False)
    ordered, chained, calls = trace_units(model, units, batches[0])
    reporter.stage("reconstruct", total=cfg.iters * len(ordered))
    stats = []
    q_prev_out: list[torch.Tensor] | None = None
    fp_prev_out: list[torch.Tensor] | None = None
    for k, unit in enumerate(ordered):
        # Inputs: propagated from the previous unit when chained, else captured by prefix passes
        # (float: every quantizer off; quantized: the finished units before this one on).
        if chained[k] and fp_prev_out is not None:
            fp_in_b, q_in_b = fp_prev_out, q_prev_out
        else:
            _set_units_quant(model, ordered[:k], False)
            fp_in_b = capture_inputs(model, unit, batches)
            _set_units_quant(model, ordered[:k], True)
            q_in_b = capture_inputs(model, unit, batches)
        make_extra = None
        if make_extra_loss is not None:
            def make_extra(fp_out, k=k, unit=unit):
                return make_extra_loss(model, unit, k, ordered, fp_out, calls[unit.name].args, calls[unit.name].kwargs)
        stat, fp_prev_out, q_prev_out = reconstruct_unit(
            model, unit, fp_in_b, q_in_b, calls[unit.name].args, calls[unit.name].kwargs, cfg, seed * 1000 + k,
            reporter, make_extra, consume_inputs=True, keep_outputs=k + 1 < len(ordered) and chained[k + 1])
        stats.append(stat)
    _set_units_quant(model, ordered, True)
    return stats


def reconstruct_unit(model: nn.Module, unit: Unit, fp_in_b: list[torch.Tensor], q_in_b: list[torch.Tensor],
                     args: tuple, kwargs: dict, cfg: ReconConfig, unit_seed: int, reporter: Reporter = SILENT,
                     make_extra=None, consume_inputs: bool = False,
                     keep_outputs: bool = True) -> tuple[dict, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """One unit, given its float and quantized-prefix inputs (batches); its quantizers must be off.

    Returns (stats, float outputs, quantized outputs): the next unit's inputs, or None for both
    without ``keep_outputs``. ``consume_inputs`` empties the input lists once cached, so a caller
    that is done with them does not hold every input twice. The streamed path
    (:mod:`reparq.stream`) calls this directly, one decoder layer at a time."""
    module = model.get_submodule(unit.name)
    mk = dict(threshold_mb=cfg.cache_threshold_mb, cache_dir=cfg.cache_dir)
    fp_in = TensorCache(fp_in_b, name=f"{unit.name}.fp_in", consume=consume_inputs, **mk)
    q_in = TensorCache(q_in_b, name=f"{unit.name}.q_in", consume=consume_inputs, **mk)
    out_batch = cfg.recon_batch_size * 8
    # Written into the cache as they come; the next unit gets views of it where it is in memory.
    fp_out = TensorCache(run_unit(module, fp_in, args, kwargs, out_batch, cfg.micro_batch_mb), total=len(fp_in),
                         name=f"{unit.name}.fp_out", **mk)
    fp_out_b = fp_out.views(out_batch) if keep_outputs else None
    _set_units_quant(model, [unit], True)
    extra = make_extra(fp_out) if make_extra is not None else None
    fixed: set[str] = set()
    if cfg.gptq and cfg.round_weights:  # GPTQ is a weight rounding: a phase that leaves weights alone skips it
        from reparq.recipes.gptq_unit import gptq_unit  # it builds on this module (caches, early exit)

        fixed = gptq_unit(module, dict(zip(unit.layers, unit_layers(model, unit))), q_in, args, kwargs,
                          cfg.recon_batch_size * 8, damp=cfg.gptq_damp,
                          fp_in=fp_in if cfg.gptq_float_target else None,
                          quant_switch=lambda on: _set_units_quant(model, [unit], on))
    trainer = UnitTrainer(model, unit, cfg, seed=unit_seed, fixed_weights=frozenset(fixed))
    stat = trainer.train(q_in, fp_in, fp_out, args, kwargs, reporter, extra)
    q_out_b = list(run_unit(module, q_in, args, kwargs, out_batch, cfg.micro_batch_mb)) if keep_outputs else None
    for cache in (fp_in, q_in, fp_out):
        cache.close()
    return stat, fp_out_b, q_out_b
