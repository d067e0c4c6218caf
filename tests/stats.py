"""Statistics shared by the distribution tests."""

from __future__ import annotations

import torch


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor,
                      min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of `counts` to `probs` (same shape, any rank).

    Cells whose expected count is below `min_expected` are pooled into one cell, so the
    chi-square approximation holds; df = number of cells kept - 1. An observation in a cell of
    probability exactly 0 is an impossible outcome: the p-value is then 0.0, whatever else.
    """
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if float(counts[probs <= 0].sum()) > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= min_expected
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
    df = torch.tensor((int(keep.sum()) - 1) / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def conditional_fit_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of observed tokens to their own (varying) conditional distributions.

    tokens [N] int64: independent observations; probs [N, V]: the exact distribution that
    observation i was supposed to be drawn from (e.g. the target's next-token distribution
    given that sample's own prefix). D = sum_i (onehot(tokens_i) - probs_i) has mean 0 and
    covariance S = sum_i (diag(probs_i) - probs_i probs_i^T); D^T S^+ D is asymptotically
    chi-square with rank(S) degrees of freedom. A token of probability 0 gives 0.0.
    """
    probs = probs.double()
    if tokens.numel() == 0:
        return 1.0
    chosen = probs.gather(1, tokens[:, None])[:, 0]
    if bool((chosen <= 0).any()):
        return 0.0
    onehot = torch.zeros_like(probs)
    onehot[torch.arange(tokens.shape[0]), tokens] = 1.0
    diff = (onehot - probs).sum(dim=0)  # [V]
    cov = torch.diag(probs.sum(dim=0)) - probs.T @ probs  # [V, V]
    # Tokens the distributions never reach carry no information (and no variance).
    live = probs.sum(dim=0) > 1e-9
    diff, cov = diff[live], cov[live][:, live]
    eigval, eigvec = torch.linalg.eigh(cov)
    keep = eigval > 1e-9 * max(float(eigval.max()), 1.0)
    proj = eigvec[:, keep].T @ diff
    stat = float((proj ** 2 / eigval[keep]).sum())
    df = torch.tensor(int(keep.sum()) / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))
