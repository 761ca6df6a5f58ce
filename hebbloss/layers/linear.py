"""nn.Linear: z = x W^T + b over any leading dimensions; units are the last dimension.

Its backward halves, for the feedback modes: the input gradient delta @ B (B = W is backprop,
B != W feedback alignment, Lillicrap et al. 2016) and the weight gradient delta^T x.
"""
import torch
from torch import nn

from . import LayerType, register, sparse


def linear_input_grad(delta: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """delta @ B for z = x W^T + b over any leading dimensions (B of W's shape [out, in])."""
    return delta @ feedback.to(delta.dtype)


def linear_weight_grad(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over samples and leading dimensions of delta x^T, shape [out, in]."""
    return delta.reshape(-1, delta.shape[-1]).t() @ x.to(delta.dtype).reshape(-1, x.shape[-1])


class LinearAdjoint:
    """:func:`linear_input_grad` and :func:`linear_weight_grad` (also from a sparse delta's nonzeros),
    in the dtypes of x and B."""

    @staticmethod
    def input_grad(delta, x, feedback):
        return linear_input_grad(delta, feedback).to(x.dtype)

    @staticmethod
    def weight_grad(delta, x, feedback):
        return linear_weight_grad(delta, x).to(feedback.dtype)

    @staticmethod
    def sparse_weight_grad(delta, x, feedback):
        """:func:`linear_weight_grad` from delta's nonzeros (:mod:`hebbloss.layers.sparse`)."""
        return sparse.linear_sparse_weight_grad(delta, x).to(feedback.dtype)


@register(nn.Linear)
class Linear(LayerType):
    """Units are the last dimension of the output; the weight is [out, in]."""

    name, spatial_dims = "linear", 0

    def adjoint(self, module, x, output):
        return LinearAdjoint


LINEAR = Linear()
