"""Wide&Deep pieces and the split model: shapes, the wide sum, L2, seeded parts, the cut-layer contract, and that
it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vfl_cli.job import AdamSpec, FtrlSpec, ModelSpec
from vfl_cli.metrics import roc_auc
from vfl_cli.model.build import CentralModel, SplitModel, build_top
from vfl_cli.model.ftrl import Ftrl
from vfl_cli.model.optimizers import build_optimizers
from vfl_cli.model.wide_deep import WideDeepBottom, part_generator

SMALL = ModelSpec(emb_dim=4, deep_layers=(16, 8))
B, VOCAB, LEADER_F, FOLLOWER_F = 32, 50, 3, 2
CUT = {"wide": 1, "deep": 1}  # a Wide&Deep party's cut


def _joint(leader_vocab: int, leader_f: int, follower_vocab: int, follower_f: int, seed: int) -> SplitModel:
    kinds = ("numeric",) * leader_f, ("numeric",) * follower_f  # Wide&Deep treats every field alike
    return SplitModel.build(SMALL, seed, {"leader": (leader_vocab, kinds[0]), "follower": (follower_vocab, kinds[1])})


def _top(seed: int) -> torch.nn.Module:
    return build_top(SMALL, seed, [CUT, CUT], 1)


def _batch(num_fields: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, num_fields), generator=gen, dtype=torch.int32)
    return ids, torch.rand(B, num_fields, generator=gen)


def _bottom(num_fields: int, part: str = "leader", seed: int = 0) -> WideDeepBottom:
    return WideDeepBottom(VOCAB, num_fields, SMALL.emb_dim, SMALL.deep_layers, part_generator(seed, part))  # type: ignore[arg-type]


def test_bottom_shapes_and_layout() -> None:
    bottom = _bottom(LEADER_F)
    out = bottom(*_batch(LEADER_F, 0))
    wide, deep = out["wide"], out["deep"]
    assert wide.shape == (B, 1) and deep.shape == (B, 1)
    linears = [m for m in bottom.deep_mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 8), (8, 1)]
    assert isinstance(bottom.deep_mlp[-1], torch.nn.Linear)  # no ReLU after the last layer
    wide_ids = {id(p) for p in bottom.wide_parameters()}
    deep_ids = {id(p) for p in bottom.deep_parameters()}
    assert not wide_ids & deep_ids and wide_ids | deep_ids == {id(p) for p in bottom.parameters()}


def test_wide_part_is_the_weighted_sum_of_one_dim_embeddings() -> None:
    bottom = _bottom(LEADER_F)
    with torch.no_grad():
        bottom.wide_bias.fill_(0.25)
    ids, vals = _batch(LEADER_F, 1)
    wide = bottom(ids, vals)["wide"]
    table = bottom.wide_embedding.weight.detach()[:, 0]
    manual = torch.tensor(
        [[sum(table[ids[b, f]] * vals[b, f] for f in range(LEADER_F)) + 0.25] for b in range(B)]
    )
    torch.testing.assert_close(wide.detach(), manual)


def test_int32_and_int64_ids_agree() -> None:
    bottom = _bottom(LEADER_F)
    ids, vals = _batch(LEADER_F, 2)
    for a, b in zip(bottom(ids, vals).values(), bottom(ids.long(), vals).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_l2_penalty_is_half_coef_times_squared_deep_table() -> None:
    bottom = _bottom(LEADER_F)
    expected = 0.5 * 8e-5 * (bottom.deep_embedding.weight.detach().double() ** 2).sum().item()
    assert bottom.l2_penalty(8e-5).item() == pytest.approx(expected, rel=1e-6)
    assert bottom.l2_penalty(1.0).requires_grad
    assert bottom.l2_value(8e-5) == pytest.approx(expected, rel=1e-6)


def test_parts_built_alone_equal_the_joint_model() -> None:
    joint = _joint(VOCAB, LEADER_F, VOCAB, FOLLOWER_F, 7)
    leader, follower = _bottom(LEADER_F, "leader", 7), _bottom(FOLLOWER_F, "follower", 7)
    top = _top(7)
    for built, alone in ((joint.leader, leader), (joint.followers[0], follower), (joint.top, top)):
        for (name, a), b in zip(built.state_dict().items(), alone.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert not torch.equal(leader.deep_embedding.weight, _bottom(LEADER_F, "leader", 8).deep_embedding.weight)

    (lids, lvals), (fids, fvals) = _batch(LEADER_F, 3), _batch(FOLLOWER_F, 4)
    logits = joint(lids, lvals, fids, fvals)
    assert logits.shape == (B, 1)
    torch.testing.assert_close(logits, top([leader(lids, lvals), follower(fids, fvals)]), rtol=0, atol=0)


def test_split_backward_through_the_cut_equals_joint_gradients() -> None:
    """Only (wide, deep) [B,1] cross forward and their gradients back, yet every grad is the joint's."""
    joint = _joint(VOCAB, LEADER_F, VOCAB, FOLLOWER_F, 0)
    leader, follower = _bottom(LEADER_F, "leader", 0), _bottom(FOLLOWER_F, "follower", 0)
    top = _top(0)
    (lids, lvals), (fids, fvals) = _batch(LEADER_F, 5), _batch(FOLLOWER_F, 6)
    labels = (torch.rand(B, generator=torch.Generator().manual_seed(9)) < 0.5).float()
    F.binary_cross_entropy_with_logits(joint(lids, lvals, fids, fvals)[:, 0], labels).backward()

    follower_out = follower(fids, fvals)  # follower: forward, send
    received = {name: t.detach().requires_grad_() for name, t in follower_out.items()}  # leader: receive
    F.binary_cross_entropy_with_logits(top([leader(lids, lvals), received])[:, 0], labels).backward()
    torch.autograd.backward(list(follower_out.values()), [t.grad for t in received.values()])  # follower: apply

    for split, ref in ((leader, joint.leader), (follower, joint.followers[0]), (top, joint.top)):
        for (name, mine), theirs in zip(split.named_parameters(), ref.parameters(), strict=True):
            assert mine.grad is not None and theirs.grad is not None, name
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_central_model_is_wide_plus_deep() -> None:
    model = CentralModel(SMALL, 0, VOCAB, ("numeric",) * 5, 1)
    ids, vals = _batch(5, 7)
    assert model.bottom is not None
    cut = model.bottom(ids, vals)
    torch.testing.assert_close(model(ids, vals), cut["wide"] + cut["deep"])


def test_build_optimizers_uses_the_specs() -> None:
    joint = _joint(VOCAB, LEADER_F, VOCAB, FOLLOWER_F, 0)
    ftrl, adam = build_optimizers(joint.wide_parameters(), joint.deep_parameters(), FtrlSpec(), AdamSpec())
    assert isinstance(ftrl, Ftrl) and isinstance(adam, torch.optim.Adam)
    assert ftrl.defaults["lr"] == 5e-2 and ftrl.defaults["initial_accumulator"] == 1.0
    assert adam.defaults["lr"] == 3.5e-4 and adam.defaults["eps"] == 1e-8
    covered = [id(p) for opt in (ftrl, adam) for g in opt.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in joint.parameters())


def test_a_planted_signal_is_learned() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 512
    lids = torch.randint(0, 20, (n, LEADER_F), generator=gen, dtype=torch.int32)
    fids = torch.randint(0, 20, (n, FOLLOWER_F), generator=gen, dtype=torch.int32)
    lvals, fvals = torch.ones(n, LEADER_F), torch.ones(n, FOLLOWER_F)
    # The label depends on one id of each party: only a model that uses both sides can fit it.
    truth = torch.where(lids[:, 0] < 10, 2.0, -2.0) + torch.where(fids[:, 1] % 2 == 0, 1.5, -1.5)
    labels = (torch.rand(n, generator=gen) < torch.sigmoid(truth)).float()

    joint = _joint(20, LEADER_F, 20, FOLLOWER_F, 0)
    opts = build_optimizers(
        joint.wide_parameters(), joint.deep_parameters(), FtrlSpec(lr=0.5), AdamSpec(lr=1e-2), 8e-5,
        joint.embedding_tables(),
    )

    def loss() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(joint(lids, lvals, fids, fvals)[:, 0], labels)

    first = loss().item()
    for _ in range(40):
        for opt in opts:
            opt.zero_grad()
        loss().backward()
        for opt in opts:
            opt.step()
    assert loss().item() < first - 0.1
    with torch.no_grad():
        assert roc_auc(labels, joint(lids, lvals, fids, fvals)[:, 0]) > 0.8


def test_bottom_forward_equals_embedding_times_values() -> None:
    """The embedding_bag forward is the reference formula: sum_f wide[id] * val and MLP(deep[ids] * vals)."""
    bottom = WideDeepBottom(VOCAB, 5, SMALL.emb_dim, SMALL.deep_layers, part_generator(0, "leader"))
    ids, vals = _batch(5, 33)  # vals uniform in [0, 1), as dense fields have
    out = bottom(ids, vals)
    wide, deep = out["wide"], out["deep"]
    reference_wide = (bottom.wide_embedding(ids).squeeze(-1) * vals).sum(dim=1, keepdim=True) + bottom.wide_bias
    reference_deep = bottom.deep_mlp((bottom.deep_embedding(ids) * vals.unsqueeze(-1)).view(len(ids), -1))
    torch.testing.assert_close(wide, reference_wide, rtol=1e-6, atol=1e-7)
    assert torch.equal(deep, reference_deep)  # per-row gather and scale: the same float products


def test_weight_decay_on_the_tables_is_the_l2_term_in_the_loss() -> None:
    """build_optimizers' fused Adam with weight decay on the embedding tables follows the same path as plain Adam
    on loss + 0.5 * l2 * ||tables||^2 (the L2 term of the reference)."""
    l2 = 1e-2  # large, so a missing or doubled term would show
    fused = _joint(VOCAB, LEADER_F, VOCAB, FOLLOWER_F, 0)
    plain = _joint(VOCAB, LEADER_F, VOCAB, FOLLOWER_F, 0)
    fused_opts = build_optimizers(fused.wide_parameters(), fused.deep_parameters(), FtrlSpec(), AdamSpec(lr=1e-2),
                                  l2, fused.embedding_tables())
    plain_opts = [Ftrl(plain.wide_parameters(), lr=FtrlSpec().lr, l1=FtrlSpec().l1, l2=FtrlSpec().l2,
                       initial_accumulator=FtrlSpec().initial_accumulator),
                  torch.optim.Adam(plain.deep_parameters(), lr=1e-2, eps=AdamSpec().eps)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        lids = torch.randint(0, VOCAB, (16, LEADER_F), generator=gen, dtype=torch.int32)
        fids = torch.randint(0, VOCAB, (16, FOLLOWER_F), generator=gen, dtype=torch.int32)
        lvals, fvals, labels = torch.rand(16, LEADER_F), torch.rand(16, FOLLOWER_F), torch.rand(16).round()
        for model, opts, with_l2 in ((fused, fused_opts, False), (plain, plain_opts, True)):
            for opt in opts:
                opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(lids, lvals, fids, fvals)[:, 0], labels)
            penalty = sum(b.l2_penalty(l2) for b in model.bottoms())
            (loss + penalty if with_l2 else loss).backward()
            for opt in opts:
                opt.step()
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    untrained = _joint(VOCAB, LEADER_F, VOCAB, FOLLOWER_F, 0)
    assert fused.leader is not None and untrained.leader is not None
    assert not torch.allclose(fused.leader.deep_embedding.weight, untrained.leader.deep_embedding.weight)
