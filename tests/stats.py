"""Statistics shared by the distribution tests."""

from __future__ import annotations

import torch


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor,
                      min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of `counts` to `probs` (same shape, any rank).

    Cells whose expected count is below `min_expected` are pooled into one cell, so the
    chi-square approximation holds; df = number of cells kept - 1.
    """
    counts, probs = counts.flatten().double(), probs.flatten().double()
    expected = probs * counts.sum()
    big = expected >= min_expected
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
    df = torch.tensor((int(keep.sum()) - 1) / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))
