"""The fused CPU kernel against the pure-PyTorch formulas (its oracle). Skipped when it cannot be
built here, unless kernels are required (PATCHSPARSE_REQUIRE_KERNELS=1, as in CI): then a failed
build fails every test."""

import pytest
import torch

from patchsparse.learn.fused import KERNEL, fused_hybrid_weight, load_extension
from patchsparse.learn.masked import _AddToLoss
from patchsparse.learn.soft_masks import hybrid_soft_weight, soft_nm_mask
from patchsparse.masks import TileGrid
from patchsparse.native import kernels_required

pytestmark = pytest.mark.skipif(not kernels_required() and load_extension() is None,
                                reason=f"fused kernel: {KERNEL.status()}")


def _case(shape, tile, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=g)
    grid = TileGrid.for_weight(weight, tile)
    logits = (torch.randn(shape[0], shape[1] // 4, 6, generator=g) * 0.05).requires_grad_(True)
    noise = torch.randn(shape[0], shape[1] // 4, 6, generator=g)
    tiles = torch.rand(*grid.shape, generator=g).requires_grad_(True)
    grad = torch.randn(*shape, generator=g)
    return weight, grid, logits, noise, tiles, grad


@pytest.mark.parametrize("shape,tile", [((12, 40), (4, 8)), ((10, 36), (4, 16)), ((7, 8), (16, 16))])
@pytest.mark.parametrize("norm_term", [0.0, -0.3])
def test_fused_joint_matches_reference(shape, tile, norm_term):
    weight, grid, logits, noise, tiles, grad = _case(shape, tile)
    out, norm = fused_hybrid_weight(weight, logits, noise, None, tiles, 30.0, 0.7, grid)
    if norm_term:
        out = _AddToLoss.apply(out, norm, norm_term)
    (out * grad).sum().backward()
    g_logits, g_tiles = logits.grad.clone(), tiles.grad.clone()
    logits.grad = tiles.grad = None
    ref = hybrid_soft_weight(weight, soft_nm_mask(logits, noise, 30.0, 0.7), tiles, grid)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.detach(), ref.detach().norm(), rtol=1e-5, atol=1e-6)
    ((ref * grad).sum() + norm_term * ref.norm()).backward()
    torch.testing.assert_close(g_logits, logits.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_tiles, tiles.grad, rtol=1e-4, atol=1e-5)


def test_fused_frozen_mask_and_no_tiles():
    weight, grid, logits, noise, tiles, grad = _case((8, 24), (4, 8), seed=1)
    keep = torch.rand(8, 24) > 0.5
    out, _ = fused_hybrid_weight(weight, None, None, keep, tiles, 1.0, 1.0, grid)
    (out * grad).sum().backward()
    g_tiles = tiles.grad.clone()
    tiles.grad = None
    ref = hybrid_soft_weight(weight, keep.float(), tiles, grid)
    (ref * grad).sum().backward()
    torch.testing.assert_close(out.detach(), ref.detach())
    torch.testing.assert_close(g_tiles, tiles.grad, rtol=1e-4, atol=1e-5)
    # maskllm: no tiles, no noise
    out, _ = fused_hybrid_weight(weight, logits, None, None, None, 100.0, 4.0, None)
    torch.testing.assert_close(out, weight * soft_nm_mask(logits, None, 100.0, 4.0), rtol=1e-5, atol=1e-6)


def _subnormal_count(x: torch.Tensor) -> int:
    return int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())


def test_fused_kernel_flushes_subnormals_at_the_end_of_annealing():
    # κ/τ = 500/0.05 = 1e4: a pattern Δ below the winner has probability exp(-1e4·Δ), subnormal
    # for Δ in about (0.0087, 0.0104); logits spread over 0.02 put many patterns there.
    weight, grid, _, _, tiles, grad = _case((64, 256), (16, 64), seed=3)
    logits = (torch.rand(64, 64, 6, generator=torch.Generator().manual_seed(4)) * 0.02).requires_grad_(True)
    unflushed = weight * soft_nm_mask(logits.detach(), None, 500.0, 0.05)
    assert _subnormal_count(unflushed) > 0  # the case does reach the subnormal range
    out, _ = fused_hybrid_weight(weight, logits, None, None, tiles.detach() * 0, 500.0, 0.05, grid)
    (out * grad).sum().backward()
    assert _subnormal_count(out) == 0
    assert _subnormal_count(logits.grad) == 0
    torch.testing.assert_close(out.detach(), unflushed, rtol=1e-4, atol=1e-6)
