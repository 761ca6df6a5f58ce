"""Training without weight symmetry on any model: feedback alignment and its sign-concordant,
updated-feedback (Amit 2019) and Kolen-Pollack variants, with Amit's Hebbian output cost,
untied convolutions, Batch Manhattan and alignment metrics.
"""
from .amit_loss import AmitHingeLoss, amit_hinge
from .convert import Feedback, convert, converted_layers
from .locally_connected import LocallyConnected2d, local_conv2d, untie
from .manhattan import BatchManhattan
from .metrics import angle, feedback_angles, input_gradient_angles
from .modes import MODES

__all__ = [
    "AmitHingeLoss", "BatchManhattan", "Feedback", "LocallyConnected2d", "MODES", "amit_hinge", "angle",
    "convert", "converted_layers", "feedback_angles", "input_gradient_angles", "local_conv2d", "untie",
]
