"""The general bottom: a party's numeric and categorical columns -> its cut output, `{"cut": [B, cut_dim]}`.

Each categorical column's id looks up an `emb_dim` embedding (one table over the party's whole id range, as
Wide&Deep's); numeric columns enter as their prepared values; an MLP (`deep_layers`, ReLU between) maps the
row to `cut_dim` values. Which column is which kind comes from the prepared data's `kinds`.

Example:
    >>> bottom = MlpBottom(100, ("numeric", "categorical"), emb_dim=8, layers=(32,), cut_dim=16)
    >>> bottom(torch.tensor([[0, 5]], dtype=torch.int32), torch.tensor([[0.3, 1.0]]))["cut"].shape
    torch.Size([1, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfl_cli.job import CUT_TENSOR as CUT
from vfl_cli.model.wide_deep import embedding, linear


class MlpBottom(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        kinds: Sequence[str],
        emb_dim: int,
        layers: Sequence[int],
        cut_dim: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        numeric = [j for j, kind in enumerate(kinds) if kind == "numeric"]
        categorical = [j for j, kind in enumerate(kinds) if kind == "categorical"]
        self.numeric: Tensor
        self.categorical: Tensor
        self.register_buffer("numeric", torch.tensor(numeric, dtype=torch.long), persistent=False)
        self.register_buffer("categorical", torch.tensor(categorical, dtype=torch.long), persistent=False)
        self.embedding = embedding(vocab_size, emb_dim, generator) if categorical else None
        widths = [len(numeric) + len(categorical) * emb_dim, *layers]
        modules: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            modules += [linear(d_in, d_out, generator), nn.ReLU()]
        modules.append(linear(widths[-1], cut_dim, generator))
        self.mlp = nn.Sequential(*modules)

    def forward(self, ids: Tensor, vals: Tensor) -> dict[str, Tensor]:
        parts = [vals.index_select(1, self.numeric)]  # (B, numeric columns)
        if self.embedding is not None:
            codes = ids.index_select(1, self.categorical)  # (B, categorical columns)
            parts.append(F.embedding(codes, self.embedding.weight).flatten(1))  # (B, categorical * emb_dim)
        return {CUT: self.mlp(torch.cat(parts, dim=1))}

    def wide_parameters(self) -> list[Tensor]:
        return []  # no wide part: FTRL has nothing to train

    def deep_parameters(self) -> list[Tensor]:
        return list(self.parameters())

    def embedding_tables(self) -> list[Tensor]:
        return [] if self.embedding is None else [self.embedding.weight]

    @torch.no_grad()
    def l2_value(self, l2_coef: float) -> float:
        tables = self.embedding_tables()
        return 0.5 * l2_coef * sum(float(t.double().square().sum()) for t in tables)
