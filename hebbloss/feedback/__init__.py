"""Training without weight symmetry on any model: feedback alignment and its sign-concordant,
updated-feedback (Amit 2019) and Kolen-Pollack variants, with Amit's Hebbian output cost,
untied convolutions, Amit's stabilisers, Batch Manhattan, the weight-norm constraint of Moskovitz et
al. (2018), optimizer param groups that decay W and B as the modes' authors do, and alignment metrics.
"""
from .amit_loss import AmitHingeLoss, amit_hinge
from .convert import Feedback, convert, converted_layers
from .groups import param_groups
from .locally_connected import LocallyConnected2d, local_conv2d, untie
from .manhattan import BatchManhattan
from .metrics import angle, feedback_angles, input_gradient_angles
from .modes import MODES, usf_scale
from .norm_constraint import constrain_norms, constrain_norms_after_step, frobenius_norms
from .stabilisers import BackwardClip, ClippedRamp, clip_weights, clip_weights_after_step, glorot_bound

__all__ = [
    "AmitHingeLoss", "BackwardClip", "BatchManhattan", "ClippedRamp", "Feedback", "LocallyConnected2d", "MODES",
    "amit_hinge", "angle", "clip_weights", "clip_weights_after_step", "constrain_norms", "constrain_norms_after_step",
    "convert", "converted_layers", "feedback_angles", "frobenius_norms", "glorot_bound", "input_gradient_angles",
    "local_conv2d", "param_groups", "untie", "usf_scale",
]
