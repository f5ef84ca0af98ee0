"""Int8 linear layers whose rounding does not depend on what else is in the batch (``--quantize int8``).

Why not torch's stock dynamic int8 linear: it rounds weights with one scale per matrix and activations with one
scale per *batch*. On MiniLM both cost fidelity that tuning needs: a weight matrix's largest row sets every
row's step, and the largest entry anywhere in a micro-batch -- often a candidate prompt's -- sets the step for
every token of every other candidate, so a candidate's score moved with its batch-mates and CMA-ES ranked that
noise (BBTv2 lost 19 points of AG News accuracy against it). Here each weight row (output channel) gets its
own scale, and each token its own range: a row of activations is mapped onto [-1, 1] by its own minimum and
maximum before torch's int8 kernel quantizes the batch on that one known range, and the product is mapped
back: ``W x = half * W x' + mid * W 1`` for ``x = half * x' + mid``.

Weights use 7 bits and activations 8: x86 CPUs without AVX-512 VNNI multiply uint8 by int8 with 16-bit
saturating adds, which 8 bits on both sides overflow; the activations are where the bits matter here.

Outlier channels: a few input channels of BERT-style models carry entries many times larger than the rest
(the same channels in every token), so a token's range -- and with it every other channel's rounding step --
is theirs. :func:`quantize_linear_int8` with ``calibrate`` finds each linear's largest input channels on one
forward pass the caller runs (the server: its reference text, no task data) and keeps those ``outliers``
channels in float32, as LLM.int8() does with its outlier columns but with a fixed set, so a row's output still
never depends on its batch-mates. On MiniLM, 16 channels per linear took the training-loss correlation of
close candidates with fp32 from 0.66 / 0.91 / 0.95 to 0.91 / 0.99 / 0.96 (``benchmarks/int8_fidelity.py``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

_WEIGHT_MAX = 63  # 7 bits: |w| * 255 * 2 stays inside int16 (see the module docstring)
#: Input channels per linear kept in float32 when :func:`quantize_linear_int8` is given a calibration pass.
OUTLIER_CHANNELS = 16


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (a scale per output channel) and int8 activations (a range per token);
    the input channels listed in ``outliers`` stay float32 on both sides."""

    def __init__(self, linear: nn.Linear, outliers: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float().clone()
        idx = torch.zeros(0, dtype=torch.long) if outliers is None else outliers.to(torch.long).sort().values
        exact = w[:, idx].T.contiguous()  # (K, out): the outlier channels' weights, float32
        w[:, idx] = 0  # nor do they set a row's weight scale
        scale = (w.abs().amax(1) / _WEIGHT_MAX).clamp(min=1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the kernels still ship
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        # What each token's midpoint multiplies (the quantized weights' row sums), the bias, and the outlier
        # channels' float weights, stacked: one product of rank 2 + K adds all three to the output.
        bias = _bias(linear)
        self.register_buffer("_offsets", torch.cat([qweight.dequantize().sum(1)[None], bias[None], exact]))
        self.register_buffer("_outliers", idx)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx = self._outliers
        extra = [x.index_select(1, idx)] if len(idx) else []
        if extra and _may_write(x):  # zeroed for the range, then put back: no copy of the whole input
            x.index_fill_(1, idx, 0.0)
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # 5x faster than aminmax here
            x.index_copy_(1, idx, extra[0])
        else:
            ranged = x.index_fill(1, idx, 0.0) if extra else x  # the token's range is the other channels'
            lo, hi = ranged.amin(-1, keepdim=True), ranged.amax(-1, keepdim=True)
        half = ((hi - lo) / 2).clamp_(min=1e-12)
        mid = (hi + lo) / 2
        # Each row now spans [-1, 1]: the batch's range is known, so the kernel need not look for it. The
        # outlier channels' entries fall anywhere (clamped): their int8 weights are zero, their part comes in
        # exactly through the offsets' last K rows.
        xq = torch.addcmul(-mid / half, x, 1 / half)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(xq, 2.0 / 255, 128, self._packed)
        y.mul_(half).addmm_(torch.cat([mid, torch.ones_like(mid), *extra], 1), self._offsets)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel x per token, "
                f"{len(self._outliers)} float32 input channels")


def _may_write(x: torch.Tensor) -> bool:
    """Whether ``x`` may be changed in place for a moment: no autograd history to break, its own memory."""
    return not (x.requires_grad and torch.is_grad_enabled()) and x.is_contiguous()


class SiblingGroup:
    """Linears that read the same tensor (a layer's query, key and value): one int8 product serves them all.

    Why: the work around the int8 kernel (each token's range, the rescale, the output's correction) is per input,
    and one wide product runs faster than several narrow ones: on MiniLM's 2,048-row micro-batches query, key
    and value took 8.3 ms fused against 10.9 ms apart (float32: 10.9), their outputs bit for bit the same.
    Whichever member is called first with a tensor computes every part and keeps the others' until they are
    asked for (holding that tensor till then); a member called with any other tensor (or one changed in place
    since, where torch tracks that) computes afresh. Model code never changes a layer's input between its
    projections: autograd would refuse.
    """

    def __init__(self, fused: Int8Linear, sizes: list[int]):
        self.fused = fused
        ends = torch.tensor(sizes).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        self._x: torch.Tensor | None = None
        self._version: int | None = None
        self._parts: dict[int, torch.Tensor] = {}

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is self._x and _version(x) == self._version and i in self._parts:
            part = self._parts.pop(i)
            if not self._parts:
                self._x = None
            return part
        y = self.fused(x)
        self._parts = {j: y[..., a:b] for j, (a, b) in enumerate(self.bounds)}
        self._x, self._version = x, _version(x)
        return self._parts.pop(i)


class Int8Sibling(nn.Module):
    """One member of a :class:`SiblingGroup`, in the place of the ``nn.Linear`` it was."""

    def __init__(self, group: SiblingGroup, index: int):
        super().__init__()
        self.shared = group.fused  # a submodule of every member (``.to()`` and ``modules()`` see it once)
        self._group, self._index = group, index
        a, b = group.bounds[index]
        self.in_features, self.out_features = group.fused.in_features, b - a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(self._index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, member {self._index} of a group"


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version  # inference tensors keep no version counter


def quantize_linear_int8(module: nn.Module, calibrate: Callable[[], object] | None = None,
                         outliers: int = OUTLIER_CHANNELS) -> int:
    """Replace each ``nn.Linear`` inside ``module``, in place, by an :class:`Int8Linear`; returns how many.

    ``calibrate``: a function running one float32 forward pass of the model; each linear then keeps the
    ``outliers`` input channels with the largest magnitudes seen in it in float32, and linears that read the
    very same tensor in it become one :class:`SiblingGroup`. Without it, neither.
    Embeddings, LayerNorms and a tied head stay float32, so prompt hooks and embedding-space prompts see the
    same tensors as before."""
    names = [name for name, m in module.named_modules() if type(m) is nn.Linear]
    peaks: dict[str, torch.Tensor] = {}
    inputs: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(_m, args, _out):
            peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)
            inputs.setdefault(name, []).append(args[0])
        return hook

    if calibrate is not None:
        handles = [module.get_submodule(name).register_forward_hook(record(name)) for name in names]
        try:
            with torch.inference_mode():
                calibrate()
        finally:
            for h in handles:
                h.remove()
    linears = {name: module.get_submodule(name) for name in names}
    outlier_idx = {
        name: torch.topk(peaks[name], min(outliers, linears[name].in_features)).indices.cpu().sort().values
        if name in peaks and outliers > 0 else None
        for name in names
    }
    groups = _siblings(names, inputs)
    for group in groups:
        fused = nn.Linear(linears[group[0]].in_features, sum(linears[n].out_features for n in group))
        with torch.no_grad():
            fused.weight.copy_(torch.cat([linears[n].weight.float() for n in group]))
            fused.bias.copy_(torch.cat([_bias(linears[n]) for n in group]))
        shared = SiblingGroup(Int8Linear(fused, outlier_idx[group[0]]), [linears[n].out_features for n in group])
        for i, name in enumerate(group):
            _replace(module, name, Int8Sibling(shared, i))
    grouped = {name for group in groups for name in group}
    for name in names:
        if name not in grouped:
            _replace(module, name, Int8Linear(linears[name], outlier_idx[name]))
    log.info("%d linear layers quantized to int8 (per channel x per token, %d float32 input channels each; "
             "engine %s)", len(names), outliers if peaks else 0, torch.backends.quantized.engine)
    return len(names)


def _siblings(names: list[str], inputs: dict[str, list[torch.Tensor]]) -> list[list[str]]:
    """Groups (in module order) of linears that each read exactly one tensor in calibration, the same one."""
    groups: dict[int, list[str]] = {}
    for name in names:
        if len(inputs.get(name, ())) == 1:
            groups.setdefault(id(inputs[name][0]), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias.detach().float() if linear.bias is not None else torch.zeros(linear.out_features)


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, new)
