"""Which compressed-tensors scheme holds each quantized layer of a reparq model, and what
cannot be written (refused before anything is written, with what to choose instead).

The format (compressed-tensors, as transformers and vLLM load it) knows integer weights,
symmetric here, per output channel, per group of input columns or per tensor, and integer input
activations at 8 bits, static per tensor (with a zero point when asymmetric) or dynamic per token. Nothing else of
reparq's deploy form fits: quantized attention matmuls (q, k, post-Softmax probabilities
with their log2 grid, v), activations below 8 bits, per-channel input quantizers, the input
affines of a consumer-side fold. :func:`layer_schemes` maps each layer's saved quantizer
description (``reparq.json``'s ``layers``) to a scheme; :func:`refusals` lists every reason the
model cannot be written, so that one error names them all.

Integers: reparq's weights are signed (``[-2^(b-1), 2^(b-1)-1]``, or the narrow grid without its
lowest value), which is the format's int grid. reparq's activations are unsigned ``[0, 2^b-1]``
with an integer zero point z; the format's are signed ``[-2^(b-1), 2^(b-1)-1]``, so the same
integers (shifted by ``2^(b-1)``) come from the zero point ``z - 2^(b-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reparq.errors import ReparqError

FLOAT_BITS = 16  # reparq's "keep float" bit width
PACKED, INT, NAIVE = "pack-quantized", "int-quantized", "naive-quantized"
ACTIVATIONS = ("static", "dynamic")


@dataclass(frozen=True)
class LayerScheme:
    """One layer's scheme: weight bits and granularity, input bits (16: float) and kind."""

    w_bits: int
    w_strategy: str  # "channel", "group" or "tensor"
    a_bits: int
    a_symmetric: bool = False
    activations: str = "static"
    storage: str | None = None  # a format of its own (the embedding: naive-quantized keeps ``weight``)
    group_size: int | None = None  # input columns per weight scale (strategy "group")

    @property
    def weight_only(self) -> bool:
        return self.a_bits >= FLOAT_BITS

    @property
    def format(self) -> str:
        """pack-quantized (int32 words of packed integers) for weight-only, int-quantized (int8
        weights) where the inputs are quantized too: what transformers decompresses and vLLM runs."""
        if self.storage:
            return self.storage
        return PACKED if self.weight_only else INT

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    def to_ct(self, targets: list[str]):
        """The compressed-tensors ``QuantizationScheme`` for ``targets``."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=self.w_bits, type="int", symmetric=True, strategy=self.w_strategy,
                                   group_size=self.group_size, dynamic=False)
        inputs = None
        if not self.weight_only:
            if self.activations == "dynamic":
                inputs = QuantizationArgs(num_bits=self.a_bits, type="int", symmetric=True, strategy="token",
                                          dynamic=True)
            else:
                inputs = QuantizationArgs(num_bits=self.a_bits, type="int", symmetric=self.a_symmetric,
                                          strategy="tensor", dynamic=False)
        return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs, format=self.format)


def _is_float(meta: dict) -> bool:
    return meta["bits"] >= FLOAT_BITS or not meta.get("initialized", True)


def layer_scheme(name: str, meta: dict, scale_numel: int, out_features: int, activations: str = "static",
                 problems: list[str] | None = None) -> LayerScheme | None:
    """The scheme of one saved layer (``meta``: its ``reparq.json`` entry; ``scale_numel``: the
    number of weight scales), or None for a float layer; what cannot be written goes to ``problems``."""
    problems = [] if problems is None else problems
    w, a = meta["weight"], meta["input"]
    if meta.get("type") != "QLinear":
        problems.append(f"{name} is a {meta.get('type')}: only Linear layers can be written")
        return None
    if _is_float(w):
        if not _is_float(a):
            problems.append(f"{name} keeps float weights but quantizes its inputs to {a['bits']} bits, which the "
                            f"format cannot hold; quantize its weights too or leave it float (ignore)")
        return None
    if not w["symmetric"]:
        problems.append(f"{name} has asymmetric weights; the export writes symmetric integer weights: quantize "
                        f"with symmetric weights (reparq's default)")
    group_size = w.get("group_size")
    if group_size is not None and scale_numel > 1:
        w_strategy = "group"
        if not _is_float(a):
            problems.append(f"{name} has grouped weight scales (group {group_size}) and quantized inputs; the "
                            f"runtimes' integer kernels take one weight scale per output channel: quantize W8A8 "
                            f"without w_group_size, or weight-only (a_bits=16) with it")
    elif scale_numel == 1:
        w_strategy = "tensor"
    elif scale_numel == out_features and w.get("channel_axis") == 0:
        w_strategy = "channel"
    else:
        problems.append(f"{name} has {scale_numel} weight scales for {out_features} output channels: only per "
                        f"output channel or per tensor can be written")
        w_strategy = "channel"
    if _is_float(a):
        return LayerScheme(w["bits"], w_strategy, FLOAT_BITS, group_size=group_size if w_strategy == "group" else None)
    if a["bits"] < 8:
        problems.append(f"{name} quantizes its inputs to {a['bits']} bits; the format's integer kernels take 8-bit "
                        f"activations: choose a_bits=8 (W8A8) or weight-only (a_bits=16, W4A16 / W8A16)")
    elif w["bits"] < 8:
        problems.append(f"{name} is W{w['bits']}A{a['bits']}: with quantized activations the runtimes take 8-bit "
                        f"weights; choose W8A8, or W{w['bits']}A16 (weight-only)")
    if a.get("channel_axis") is not None:
        problems.append(f"{name} quantizes its inputs per channel; only per-tensor inputs can be written: fold "
                        f"them (the post-norm reparameterization) or calibrate per tensor")
    if activations not in ACTIVATIONS:
        raise ReparqError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    return LayerScheme(w["bits"], w_strategy, a["bits"], bool(a["symmetric"]), activations)


def attention_refusals(attention: dict) -> list[str]:
    """The attention modules whose matmul inputs reparq quantizes: the format has no place for them."""
    quantized = {n: d for n, d in attention.items() if d.get("bits", FLOAT_BITS) < FLOAT_BITS}
    if not quantized:
        return []
    first, desc = next(iter(quantized.items()))
    return [f"the attention matmuls of {len(quantized)} module(s) (e.g. {first}) are quantized (q, k, v at "
            f"{desc['bits']} bits, probabilities on a {desc.get('probs')} grid), which the compressed-tensors "
            f"format for transformers cannot hold; quantize with ignore=('*self_attn',) so they stay float "
            f"(the Linear layers inside are still quantized)"]


def state_refusals(keys, small: dict) -> list[str]:
    """What the saved tensors show that no plain model of the architecture can hold: a
    consumer-side fold's input affine that is not the identity (it sits in front of the input
    quantizer, where the format has nothing), a norm's fold shift (RMSNorm has no bias), a
    QPRep output affine not folded. ``small``: those (small) tensors by name."""
    problems = []
    for key in sorted(keys):
        if key.endswith(".input_affine.mul") and not (bool((small[key] == 1).all())
                                                      and bool((small[key[:-4] + ".add"] == 0).all())):
            problems.append(f"{key[:-len('.input_affine.mul')]} has a consumer-side input affine (x * mul + add "
                            f"before its input quantizer) that folds nowhere in the architecture; quantize "
                            f"without consumer_fold")
        elif key.endswith(".shift") and key.rsplit(".", 1)[0] + ".norm.weight" in keys:
            problems.append(f"{key[:-len('.shift')]} adds a per-channel shift after the norm (a post-norm fold with "
                            f"per-channel zero points), which a bias-free norm cannot hold; calibrate with one "
                            f"shared zero point (the RMSNorm default)")
        elif ".output_affine." in key:
            problems.append(f"{key} is a QPRep affine that was never folded; export the folded model")
    return problems


SMALL_SUFFIXES = (".input_affine.mul", ".input_affine.add", ".shift")


def needs_value(key: str) -> bool:
    """Whether :func:`state_refusals` reads this tensor's values (not only its name)."""
    return key.endswith(SMALL_SUFFIXES)


def refuse(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ReparqError("cannot export to the Hugging Face compressed-tensors format: " + "; ".join(problems[:5])
                          + more + ". Nothing was written.")


__all__ = ["ACTIVATIONS", "FLOAT_BITS", "INT", "LayerScheme", "PACKED", "attention_refusals", "layer_scheme",
           "needs_value", "refuse", "state_refusals"]
