"""The optimisers of a party's model: FTRL on the wide parameters, Adam on the rest, as MindSpore's Wide&Deep
does; the L2 term on the embedding tables is Adam's (coupled) weight decay, the same gradient as the loss term."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from vfl_cli.job import AdamSpec, FtrlSpec
from vfl_cli.model.ftrl import Ftrl


def build_optimizers(
    wide_params: Iterable[Tensor],
    deep_params: Iterable[Tensor],
    ftrl: FtrlSpec,
    adam: AdamSpec,
    l2_coef: float = 0.0,
    embedding_tables: Sequence[Tensor] = (),
) -> list[torch.optim.Optimizer]:
    """[FTRL over the wide parameters, Adam over the deep ones] (Adam alone when there are no wide ones); step
    each after each backward.

    The L2 term 0.5 * l2_coef * ||table||^2 on each of `embedding_tables` (which must be among the deep
    parameters) is applied as Adam's coupled weight decay on those tables: Adam adds l2_coef * table to their
    gradient, exactly the term's gradient, without a pass of autograd over the whole table. Adam is the fused
    kernel (one pass over parameter, gradient and both moments, ~5x faster than the loop over tensors on CPU).
    """
    deep = list(deep_params)
    decayed = {id(t) for t in embedding_tables}
    if not decayed <= {id(t) for t in deep}:
        raise ValueError("embedding_tables must be among the deep parameters")
    groups: list[dict[str, Any]] = [
        {"params": [t for t in deep if id(t) in decayed], "weight_decay": l2_coef},
        {"params": [t for t in deep if id(t) not in decayed], "weight_decay": 0.0},
    ]
    wide = list(wide_params)
    adam_over_deep = torch.optim.Adam([g for g in groups if g["params"]], lr=adam.lr, eps=adam.eps, fused=True)
    if not wide:  # an mlp bottom has no wide part
        return [adam_over_deep]
    return [Ftrl(wide, lr=ftrl.lr, l1=ftrl.l1, l2=ftrl.l2, initial_accumulator=ftrl.initial_accumulator),
            adam_over_deep]
