"""Cut-layer defences, each applied by the party that owns the secret before the tensor leaves it.

`mechanisms` holds the differential-privacy style defences (label randomised response, gradient perturbation and
Marvell's class-dependent gradient noise at the leader, embedding DP and 1-bit randomised response at the follower);
`quantize` holds min-max bit-packed quantisation of any wire tensor. All are pure torch/numpy functions with an
explicit generator where random; the training loop, job spec and wire format decide when to call them.
"""

from vfl_cli.privacy.marvell import marvell_noise
from vfl_cli.privacy.mechanisms import (
    embedding_dp,
    flip_probability,
    one_bit_rr,
    perturb_gradients,
    randomized_response,
)
from vfl_cli.privacy.quantize import (
    QuantizedTensor,
    dequantize,
    pack_bits,
    packed_size,
    quantize,
    unpack_bits,
)

__all__ = [
    "QuantizedTensor",
    "dequantize",
    "embedding_dp",
    "flip_probability",
    "marvell_noise",
    "one_bit_rr",
    "pack_bits",
    "packed_size",
    "perturb_gradients",
    "quantize",
    "randomized_response",
    "unpack_bits",
]
