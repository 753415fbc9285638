"""``nn.Linear`` and transformers' ``Conv1D`` (weight stored ``(in, out)``) adapters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdora.fast import EvalPlan, dora_linear, dora_linear_eval, eval_plan
from torchdora.layers.base import AdapterLayer, is_conv1d

__all__ = ["LinearAdapter"]


class LinearAdapter(AdapterLayer):
    """``nn.Linear`` (weight ``(out, in)``) or transformers ``Conv1D`` (weight ``(in, out)``, ``fan_in_fan_out``)."""

    stacks_mixed_batch = True

    def __init__(self, base: nn.Module, **kwargs) -> None:
        self.fan_in_fan_out = is_conv1d(base)
        if not (isinstance(base, nn.Linear) or self.fan_in_fan_out):
            raise TypeError(f"LinearAdapter wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if not base.weight.is_floating_point():  # e.g. a packed 4/8-bit weight: its norm would be meaningless
            raise TypeError(
                f"{type(base).__name__} holds a {base.weight.dtype} weight; torchdora adapts floating-point "
                "weights only. Load the model unquantized or exclude this module via exclude_modules"
            )
        super().__init__(base, **kwargs)

    @property
    def in_features(self) -> int:
        w = self.base.weight
        return w.shape[0] if self.fan_in_fan_out else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base.weight
        return w.shape[1] if self.fan_in_fan_out else w.shape[0]

    def _lora_A_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_features)

    def _lora_B_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r)

    def weight_2d(self) -> Tensor:
        w = self.base.weight
        return w.T if self.fan_in_fan_out else w

    def _base_product(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_2d())

    def _lora_product(self, x: Tensor) -> Tensor:
        a = self.lora_A
        return F.linear(F.linear(x.to(a.dtype), a), self.lora_B).to(x.dtype)

    def _fast_forward(self, x: Tensor) -> Tensor | None:
        weight, bias = self.weight_2d(), self._bias()
        # a dtype cast is the reference path's; autocast would recast the fused matmuls mid-way
        if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        dropout = self._dropout_active() and not self.magnitude_only
        if not torch.is_grad_enabled() and not dropout:
            return dora_linear_eval(x, weight, self._eval_plan(bias, x.dtype))
        if (
            weight.requires_grad
            or (bias is not None and bias.requires_grad)
            or (dropout and type(self.lora_dropout) is not nn.Dropout)  # a custom dropout module: reference path
        ):
            return None
        # Backward recovers x Wᵀ + s·(x Aᵀ) Bᵀ from the output by dividing by m / n: exact unless m has a zero,
        # or a low-precision output holds a bias that the subtraction y − b would cancel against.
        save_output = (torch.is_grad_enabled() and (bias is None or x.dtype in (torch.float32, torch.float64))
                       and not self._magnitude_has_zero())  # without autograd nothing is saved: no lookup
        return dora_linear(
            x, weight, bias, self.lora_A_2d(), self.lora_B_2d(), self.dora_factor(), self.scaling,
            self.dropout_p if dropout else 0.0, save_output=save_output, recompute=self.recompute_output,
        )

    def _eval_plan(self, bias: Tensor | None, dtype: torch.dtype) -> EvalPlan:
        """The current adapter's :func:`torchdora.fast.eval_plan` for inputs of ``dtype``, cached with the factor's
        rule (:mod:`torchdora.cache`): inference then runs as many operations per layer as LoRA's forward."""
        adapter = self.adapter
        inputs = self._cache_inputs()  # what the factor depends on (a layer kind may add tensors: VeRA's d, b)
        return adapter._eval_cache.get(
            lambda: eval_plan(bias, self.lora_A_2d(), self.lora_B_2d(), self.dora_factor(), adapter.scaling, dtype),
            inputs["tensors"] + (adapter._parameters["magnitude"], bias), inputs["extra"] + (dtype,),
        )
