"""Products with a lower-triangular factor that skip its zero triangle."""

import pytest
import torch

import lors_convert.decompose.triangular as triangular
from lors_convert.decompose.triangular import lower_right, lower_t_left
from lors_convert.decompose.whitener import CholeskyWhitener


@pytest.mark.parametrize("n", [5, 8, 21, 32])  # one block, exactly one, a partial last block, several
def test_blocked_products_equal_the_dense_ones_and_never_read_above_the_diagonal_blocks(monkeypatch, n):
    monkeypatch.setattr(triangular, "BLOCK", 8)
    g = torch.Generator().manual_seed(n)
    L = torch.randn(n, n, generator=g, dtype=torch.float64).tril()
    R = torch.randn(7, n, generator=g, dtype=torch.float64)
    Z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    blocks = torch.arange(n) // 8
    above = blocks[:, None] < blocks[None, :]  # rows above each column's block: zeros, never read
    used = L.masked_fill(above, float("nan"))
    torch.testing.assert_close(lower_right(R, used), R @ L, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lower_t_left(used, Z), L.T @ Z, rtol=1e-12, atol=1e-12)


def test_a_cholesky_whitener_applies_its_factor_blockwise(monkeypatch):
    """The whitener's products with its Cholesky factor (blocked) equal the dense ones."""
    monkeypatch.setattr(triangular, "BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 13, generator=g, dtype=torch.float64)
    w = CholeskyWhitener(
        C=X.T @ X / 40, damp=0.1, ridge=0.1 * float(torch.trace(X.T @ X / 40)) / 13, scale=2.0
    )
    L = w.L0 * 2.0**0.5
    R = torch.randn(9, 13, generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.right_L(R), R @ L, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.left_LT(R.T), L.T @ R.T, rtol=1e-12, atol=1e-12)
