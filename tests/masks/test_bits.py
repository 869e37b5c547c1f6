import numpy as np
import pytest
import torch

from patchsparse.masks.bits import pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 24)])
def test_pack_bits_matches_numpy_packbits(shape):
    """Saved priors were written with numpy.packbits; the shared packer gives the same bytes, so they still load."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.5
    packed = pack_bits(mask)
    assert packed.tolist() == np.packbits(mask.numpy().reshape(-1)).tolist()
    assert torch.equal(unpack_bits(packed, shape), mask)
