"""Across-block calibration: the stage term is computed and is able, alone, to lower the stage error."""

from __future__ import annotations

import copy

import torch

from reparq.config import QuantConfig
from reparq.model.blocks import discover_units
from reparq.nn.qmodules import quantized_layers
from reparq.recipes.abc import make_abc_loss, stage_tail
from reparq.recipes.baselines import range_baseline
from reparq.recipes.reconstruct import ReconConfig, lp_loss, reconstruct
from tests.test_reconstruct import TinyNet


def _stage_error(q: torch.nn.Module, fp: torch.nn.Module, x: torch.Tensor) -> float:
    """Error at the stage output when only the stem and the first block of the stage are quantized."""
    for name, layer in quantized_layers(q):
        on = name.startswith(("stem", "blocks.0"))
        layer.set_quant_enabled(on, on)
    with torch.no_grad():
        got = q.blocks(torch.relu(q.stem(x)))
        want = fp.blocks(torch.relu(fp.stem(x)))
    return float(lp_loss(got, want, 1.0))


def _run(iters: int, block_weight: float, abc: bool) -> float:
    torch.manual_seed(0)
    fp, x = TinyNet().eval(), torch.randn(64, 1, 8, 8)
    q = range_baseline(copy.deepcopy(fp), list(x.split(16)),
                       QuantConfig(w_bits=3, a_bits=3, w_estimator="mse", a_estimator="mse"))
    units = discover_units(q, block_globs=("blocks.*",), stage_globs=("blocks",))
    cfg = ReconConfig(iters=iters, recon_batch_size=16, loss_p=1.0, block_weight=block_weight)
    reconstruct(q, units, list(x.split(16)), cfg, seed=0, make_extra_loss=make_abc_loss(lam=1.0) if abc else None)
    return _stage_error(q, fp, x)


def test_only_the_stage_term_lowers_the_stage_error():
    start = _run(iters=0, block_weight=0.0, abc=False)
    without = _run(iters=150, block_weight=0.0, abc=False)  # nothing to learn from: loss is identically 0
    with_abc = _run(iters=150, block_weight=0.0, abc=True)
    assert without == start  # with the block term off and no stage term, nothing moves the error
    assert with_abc < 0.97 * start, (start, with_abc)  # measured: 8.27 -> 7.80


def test_stage_tail_stops_at_the_stage_boundary():
    torch.manual_seed(0)
    q = range_baseline(TinyNet().eval(), [torch.randn(8, 1, 8, 8)], QuantConfig())
    units = discover_units(q, block_globs=("blocks.*",), stage_globs=("blocks",))
    by_name = {u.name: u for u in units}
    ordered = [by_name[n] for n in ("stem", "blocks.0", "blocks.1", "head")]
    assert [u.name for u in stage_tail(ordered[1], 1, ordered)] == ["blocks.1"]
    assert stage_tail(ordered[2], 2, ordered) == []  # last block of its stage: no stage term
    assert stage_tail(ordered[0], 0, ordered) == []  # outside every stage
