"""Activations fused after the normalization: y = act(z) with z = (x − mean)·invstd·γ + β.

The forward kernels apply ``activate`` to z before the store; the backward kernels recompute z
from the saved input and turn dy into dz = dy·act'(z) with ``activation_grad`` (no activation
tensor is saved). A kernel selects the activation with the constexpr ``ACTIVATION`` code, so
code 0 (none) compiles to exactly the plain batch-norm kernel; leaky_relu's slope is a runtime
float. The names and codes live in ``activation_table.py``; the math of each code lives here.
``activation_inverse`` undoes an invertible activation (none; leaky_relu with a positive slope):
the memory-efficient backward recovers z from the saved output y = act(z).
"""

import triton
import triton.language as tl

from .activation_table import ACTIVATIONS, BY_NAME, activation_code

__all__ = ["ACTIVATIONS", "activate", "activation_code", "activation_grad", "activation_inverse"]

# The activations' codes come from the table (activation_table.py); code 0 is no activation.
NONE: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(BY_NAME["relu"].code)
SIGMOID: tl.constexpr = tl.constexpr(BY_NAME["sigmoid"].code)
LEAKY_RELU: tl.constexpr = tl.constexpr(BY_NAME["leaky_relu"].code)
SILU: tl.constexpr = tl.constexpr(BY_NAME["silu"].code)
TANH: tl.constexpr = tl.constexpr(BY_NAME["tanh"].code)


@triton.jit
def _tanh(z):
    # tanh(z) = 2·σ(2z) − 1: finite for every z, and accurate to a few fp32 ulps of 1.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def activate(z, ACTIVATION: tl.constexpr, slope):
    # relu: 0 if z < 0 else z (a NaN stays NaN, as in torch; tl.maximum would drop it);
    # sigmoid: σ(z) = 1/(1 + e^−z); leaky_relu: z if z > 0 else slope·z; silu: z·σ(z); tanh.
    # Code 0 returns z unchanged.
    y = z
    if ACTIVATION == RELU:
        y = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == SIGMOID:
        y = tl.sigmoid(z)
    elif ACTIVATION == LEAKY_RELU:
        y = tl.where(z > 0.0, z, z * slope)
    elif ACTIVATION == SILU:
        y = z * tl.sigmoid(z)
    elif ACTIVATION == TANH:
        y = _tanh(z)
    return y


@triton.jit
def activation_grad(dy, z, ACTIVATION: tl.constexpr, slope):
    # dz = dy·act'(z): relu 0 at z ≤ 0, else 1 (a NaN z passes dy, as torch's threshold_backward
    # does), leaky_relu slope at z ≤ 0 (torch's choice at z = 0), σ' = σ(1 − σ),
    # silu' = σ(1 + z(1 − σ)), tanh' = 1 − tanh². A zero dy gives a zero dz.
    dz = dy
    if ACTIVATION == RELU:
        dz = tl.where(z <= 0.0, 0.0, dy)
    elif ACTIVATION == SIGMOID:
        s = tl.sigmoid(z)
        dz = dy * s * (1.0 - s)
    elif ACTIVATION == LEAKY_RELU:
        dz = tl.where(z > 0.0, dy, dy * slope)
    elif ACTIVATION == SILU:
        s = tl.sigmoid(z)
        dz = dy * s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == TANH:
        t = _tanh(z)
        dz = dy * (1.0 - t * t)
    return dz


@triton.jit
def activation_inverse(y, ACTIVATION: tl.constexpr, slope):
    # z = act⁻¹(y): leaky_relu⁻¹(y) = y if y > 0 else y/slope (slope > 0, so sign(z) = sign(y));
    # code 0 returns y. Launched only with invertible codes (tritonbn.functional checks).
    z = y
    if ACTIVATION == LEAKY_RELU:
        z = tl.where(y > 0.0, y, y / slope)
    return z
