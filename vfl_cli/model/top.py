"""The label party's top: every party's cut outputs -> the head's output [B, width] (the task's width).

    concat  all parties' cut tensors side by side, in party order (the label party's first), then the MLP
    sum     each party's cut tensors side by side as one row, the rows added up (all parties' widths equal),
            then the MLP

The MLP is `top_layers` with ReLU between, then Linear -> width. The Criteo preset's top is `concat` with no
hidden layer over two Wide&Deep cuts: Linear(4, 1) over (leader wide, leader deep, follower wide, follower deep).
A label party without feature columns contributes no cut: its top sees the follower's alone.

Example:
    >>> top = Top([{"wide": 1, "deep": 1}, {"wide": 1, "deep": 1}], "concat", (), 1)
    >>> top([{"wide": w1, "deep": d1}, {"wide": w2, "deep": d2}])  # [B, 1] each -> [B, 1]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vfl_cli.model.wide_deep import linear

CutWidths = Mapping[str, int]  # one party's cut tensors: name -> width, in the order they are joined


class Top(nn.Module):
    def __init__(
        self,
        cut_widths: Sequence[CutWidths],
        combine: str,
        layers: Sequence[int],
        width: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        rows = [sum(widths.values()) for widths in cut_widths if widths]
        if combine == "sum" and len(set(rows)) > 1:
            raise ValueError(f"model.top sum: the parties' cut widths differ ({', '.join(map(str, rows))})")
        self.combine = combine
        self.names = [tuple(widths) for widths in cut_widths]
        widths = [sum(rows) if combine == "concat" else (rows[0] if rows else 0), *layers]
        modules: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            modules += [linear(d_in, d_out, generator), nn.ReLU()]
        modules.append(linear(widths[-1], width, generator))
        self.mlp = nn.Sequential(*modules)

    def forward(self, cuts: Sequence[Mapping[str, Tensor]]) -> Tensor:
        rows = [torch.cat([cut[name] for name in names], dim=1) for cut, names in zip(cuts, self.names, strict=True)
                if names]
        if self.combine == "sum":
            joined = torch.stack(rows).sum(dim=0)
        else:
            joined = torch.cat(rows, dim=1)
        return self.mlp(joined)  # (B, width)
