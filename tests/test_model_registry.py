"""The general model: the mlp bottom, concat and sum tops, a label-only leader, and split = joint for each."""

from __future__ import annotations

import pytest
import torch

from vfl_cli.job import AdamSpec, FtrlSpec, ModelSpec
from vfl_cli.model.build import CentralModel, SplitModel, build_bottom, build_top
from vfl_cli.model.mlp import MlpBottom
from vfl_cli.model.optimizers import build_optimizers
from vfl_cli.task import Task

MLP = ModelSpec(bottom="mlp", emb_dim=4, deep_layers=(16,), cut_dim=6, top_layers=(8,))
LEADER_KINDS = ("numeric", "categorical", "numeric")
FOLLOWER_KINDS = ("categorical", "numeric")
B, VOCAB = 24, 30


def _batch(kinds: tuple[str, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, len(kinds)), generator=gen, dtype=torch.int32)
    vals = torch.randn(B, len(kinds), generator=gen)
    for j, kind in enumerate(kinds):
        if kind == "categorical":
            vals[:, j] = 1.0
    return ids, vals


def test_mlp_bottom_reads_numeric_values_and_categorical_ids() -> None:
    bottom = MlpBottom(VOCAB, LEADER_KINDS, 4, (16,), 6)
    ids, vals = _batch(LEADER_KINDS, 0)
    cut = bottom(ids, vals)["cut"]
    assert cut.shape == (B, 6)
    first = bottom.mlp[0]
    assert isinstance(first, torch.nn.Linear) and first.in_features == 2 + 4  # two numeric values + one embedding
    changed_id = ids.clone()
    changed_id[:, 0] = (ids[:, 0] + 1) % VOCAB  # column 0 is numeric: its id is not read
    assert torch.equal(bottom(changed_id, vals)["cut"], cut)
    changed_code = ids.clone()
    changed_code[:, 1] = (ids[:, 1] + 1) % VOCAB  # column 1 is categorical: its id is read
    assert not torch.equal(bottom(changed_code, vals)["cut"], cut)


def test_mlp_bottom_without_categorical_columns_has_no_table() -> None:
    bottom = MlpBottom(VOCAB, ("numeric", "numeric"), 4, (), 3)
    assert bottom.embedding is None and bottom.embedding_tables() == []
    ids, vals = _batch(("numeric", "numeric"), 1)
    assert bottom(ids, vals)["cut"].shape == (B, 3)


@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("leader_kinds", [LEADER_KINDS, ()], ids=["leader-columns", "label-only"])
def test_split_backward_through_the_cut_equals_the_joint_model(combine: str, leader_kinds: tuple[str, ...]) -> None:
    """Only the cut crosses forward and its gradient back, yet every gradient is the joint model's."""
    spec = MLP.model_copy(update={"top": combine})
    task = Task("multiclass", ("a", "b", "c"))
    parties = {"leader": (VOCAB, leader_kinds), "follower": (VOCAB, FOLLOWER_KINDS)}
    joint = SplitModel.build(spec, 3, parties, task.width)
    leader = build_bottom(spec, 3, "leader", VOCAB, leader_kinds)
    follower = build_bottom(spec, 3, "follower", VOCAB, FOLLOWER_KINDS)
    assert follower is not None and (leader is None) == (not leader_kinds)
    top = build_top(spec, 3, [spec.cut_widths(len(leader_kinds)), spec.cut_widths(2)], task.width)
    (lids, lvals), (fids, fvals) = _batch(leader_kinds, 4), _batch(FOLLOWER_KINDS, 5)
    labels = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(6)).float()
    task.loss(joint(lids, lvals, fids, fvals), labels).backward()

    sent = follower(fids, fvals)
    received = {name: t.detach().requires_grad_() for name, t in sent.items()}
    own = {} if leader is None else leader(lids, lvals)
    logits = top([own, received])
    assert logits.shape == (B, 3)
    task.loss(logits, labels).backward()
    torch.autograd.backward(list(sent.values()), [t.grad for t in received.values()])

    pairs = [(follower, joint.followers[0]), (top, joint.top)]
    pairs += [(leader, joint.leader)] if leader is not None else []
    for split, ref in pairs:
        assert ref is not None
        for (name, mine), theirs in zip(split.named_parameters(), ref.parameters(), strict=True):
            assert mine.grad is not None and theirs.grad is not None, name
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sum_top_adds_the_parties_rows() -> None:
    top = build_top(MLP.model_copy(update={"top": "sum", "top_layers": ()}), 0, [{"cut": 6}, {"cut": 6}], 1)
    a, b = torch.randn(B, 6), torch.randn(B, 6)
    torch.testing.assert_close(top([{"cut": a}, {"cut": b}]), top([{"cut": a + b}, {"cut": torch.zeros(B, 6)}]))


def test_sum_top_refuses_unequal_widths() -> None:
    with pytest.raises(ValueError, match="cut widths differ"):
        build_top(MLP.model_copy(update={"top": "sum"}), 0, [{"wide": 1, "deep": 1}, {"cut": 6}], 1)


def test_a_mlp_has_no_ftrl_and_adam_covers_every_parameter() -> None:
    joint = SplitModel.build(MLP, 0, {"leader": (VOCAB, LEADER_KINDS), "follower": (VOCAB, FOLLOWER_KINDS)})
    optimizers = build_optimizers(joint.wide_parameters(), joint.deep_parameters(), FtrlSpec(), AdamSpec(), 1e-4,
                                  joint.embedding_tables())
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.Adam)
    covered = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    assert covered == {id(p) for p in joint.parameters()}


def test_central_model_without_columns_predicts_the_prior() -> None:
    model = CentralModel(MLP, 0, 0, (), 1)
    out = model(torch.zeros(5, 0, dtype=torch.int32), torch.zeros(5, 0))
    assert out.shape == (5, 1) and torch.all(out == out[0])
