"""hebbloss.feedback.LocallyConnected2d: an untied convolution, a separate filter at every output
position (Amit 2019), weight [out_h, out_w, out_channels, in_channels/groups, kh, kw].

Its output [N, out_channels, out_h, out_w] is linear in the weight, and its backward halves are
fold/unfold products at each position. Only :func:`hebbloss.feedback.convert` trains it: the
surrogate term's units (one weight row per output channel) do not fit untied weights, so
:func:`hebbloss.attach` skips it (and refuses it when named). Registered by qualified name, as the
layer lives in :mod:`hebbloss.feedback`, which builds on this package.
"""
import torch
import torch.nn.functional as F

from . import LayerType, register


class LocalAdjoint:
    """Backward halves of :func:`hebbloss.feedback.local_conv2d` for one LocallyConnected2d."""

    def __init__(self, module):
        self.m = module

    def _split(self, delta, weight):
        m, n = self.m, delta.shape[0]
        oh, ow, out_ch = weight.shape[:3]
        d = delta.reshape(n, m.groups, out_ch // m.groups, oh * ow)
        return d, weight.reshape(oh * ow, m.groups, out_ch // m.groups, -1)

    def input_grad(self, delta, x, feedback):
        """fold (the adjoint of unfold) of the per-position products of delta with B."""
        m = self.m
        d, b = self._split(delta, feedback.to(delta.dtype))
        patches = torch.einsum("ngol,lgok->ngkl", d, b).reshape(delta.shape[0], -1, d.shape[-1])
        grad = F.fold(patches, x.shape[-2:], m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return grad.to(x.dtype)

    def weight_grad(self, delta, x, feedback):
        """delta * patch^T at every position, in the weight's layout."""
        m = self.m
        d, _ = self._split(delta, feedback)
        patches = F.unfold(x.to(delta.dtype), m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        patches = patches.reshape(x.shape[0], m.groups, -1, d.shape[-1])
        return torch.einsum("ngol,ngkl->lgok", d, patches).reshape(feedback.shape).to(feedback.dtype)


@register("hebbloss.feedback.locally_connected.LocallyConnected2d")
class LocallyConnected(LayerType):
    """Channels are dimension 1 of the output [N, C, out_h, out_w]."""

    name, spatial_dims = "locally_connected2d", 2
    cannot_be_plastic = ("its weight holds a separate filter at each output position, which the surrogate "
                         "term's units do not cover; train it with hebbloss.feedback.convert() instead")

    def adjoint(self, module, x, output):
        return LocalAdjoint(module)
