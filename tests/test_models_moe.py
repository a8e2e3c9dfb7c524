"""MoE feed-forward: routing, capacity, balance loss, gradients and the model-level reporting."""
import math

import pytest
import torch

from models import DiT, MoEConfig, MoEFeedForward
from models.moe import balance_loss, capacity_keep_mask


def layer(**cfg):
    torch.manual_seed(0)
    config = MoEConfig(**{"num_experts": 4, "top_k": 2, "capacity_factor": 0.0, **cfg})
    return MoEFeedForward(16, 2.0, config)


def test_output_is_the_weighted_sum_of_the_top_k_experts():
    moe = layer()
    x = torch.randn(2, 5, 16)
    out, aux, counts = moe(x)
    tokens = x.reshape(10, 16)
    probs = torch.softmax(tokens @ moe.router.gate.weight.T, dim=-1)
    top = probs.topk(2, dim=-1)
    expected = torch.zeros_like(tokens)
    for s in range(10):
        weights = top.values[s] / top.values[s].sum()
        for j in range(2):
            expected[s] += weights[j] * moe.experts[top.indices[s, j]](tokens[s : s + 1])[0]
    assert torch.allclose(out.reshape(10, 16), expected, atol=1e-6)
    assert counts.sum() == 10 * 2  # every token reaches exactly top_k experts without capacity
    assert torch.equal(counts, torch.bincount(top.indices.reshape(-1), minlength=4))


def test_capacity_drops_are_counted():
    moe = layer(capacity_factor=1.0, top_k=1)
    x = torch.randn(1, 1, 16).expand(1, 12, 16).contiguous()  # identical tokens: all pick one expert
    out, _, counts = moe(x)
    capacity = math.ceil(1.0 * 12 * 1 / 4)  # 3
    assert moe.capacity(12) == capacity
    assert counts.max() == capacity and counts.sum() == capacity
    assert float(moe.last_dropped_fraction) == pytest.approx(9 / 12)
    assert torch.count_nonzero(out[0, capacity:]) == 0  # dropped tokens get nothing from the FFN
    assert torch.count_nonzero(out[0, :capacity]) > 0


def test_capacity_gives_first_choices_priority():
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])  # first choices: 0, 1, 0; second: 1, 0, 1
    keep = capacity_keep_mask(index, num_experts=2, capacity=2)
    # expert 0 slots: token0 (1st), token2 (1st) -> token1's 2nd choice dropped
    # expert 1 slots: token1 (1st), token0 (2nd) -> token2's 2nd choice dropped
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_balance_loss_equals_formula_on_hand_built_routing():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    index = torch.tensor([[0], [1], [0], [2]])
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    p = probs.mean(0)
    assert balance_loss(probs, index, 3).item() == pytest.approx(3 * (f * p).sum().item())
    uniform = torch.full((6, 3), 1 / 3)
    assert balance_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]]), 3).item() == pytest.approx(1.0)
    index2 = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0]])  # top-2: shares over all 8 choices
    f2 = torch.tensor([3 / 8, 2 / 8, 3 / 8])
    assert balance_loss(probs, index2, 3).item() == pytest.approx(3 * (f2 * p).sum().item())


def test_layer_aux_loss_matches_its_router():
    moe = layer()
    x = torch.randn(2, 6, 16)
    _, aux, _ = moe(x)
    probs, index, _ = moe.router(x.reshape(12, 16))
    assert aux.item() == pytest.approx(balance_loss(probs, index, 4).item())


def test_gradients_reach_router_and_experts():
    moe = layer(shared_expert=True)
    x = torch.randn(2, 6, 16, requires_grad=True)
    out, aux, counts = moe(x)
    (out.square().mean() + aux).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    for e, expert in enumerate(moe.experts):
        used = counts[e] > 0
        assert (expert.fc1.weight.grad is not None and expert.fc1.weight.grad.abs().sum() > 0) == bool(used)
    assert moe.shared_expert.fc2.weight.grad.abs().sum() > 0
    # the balance loss alone moves the router
    moe.zero_grad()
    _, aux, _ = moe(x)
    aux.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_noisy_gate_changes_choices_only_in_training():
    moe = layer(noisy_gate=True, top_k=1)
    x = torch.randn(4, 8, 16)
    moe.eval()
    _, _, clean = moe(x)
    assert torch.equal(moe(x)[2], clean)
    moe.train()
    torch.manual_seed(1)
    noisy = [moe(x)[2] for _ in range(4)]
    assert any(not torch.equal(c, clean) for c in noisy)


def test_model_reports_aux_loss_and_stats():
    torch.manual_seed(0)
    cfg = {"num_experts": 4, "top_k": 2, "every": 2, "capacity_factor": 1.0, "aux_loss_coef": 0.1}
    model = DiT(input_size=8, hidden_size=32, depth=4, num_heads=4, num_classes=10, moe=cfg)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "MoEFeedForward", "Mlp", "MoEFeedForward"]
    plain = DiT(input_size=8, hidden_size=32, depth=4, num_heads=4, num_classes=10)
    assert plain.moe_aux_loss().item() == 0 and plain.moe_stats() == []
    with torch.no_grad():  # adaLN-zero would hide the FFN; wake the gates up
        for b in model.blocks:
            b.adaLN_modulation[1].bias.normal_()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([1, 2])
    out = model(x, t, y)
    aux = model.moe_aux_loss()
    raw = [model.blocks[i].last_moe_aux for i in (1, 3)]
    assert aux.requires_grad and aux.item() == pytest.approx(0.1 * (raw[0] + raw[1]).item())
    stats = model.moe_stats()
    assert [s["block"] for s in stats] == [1, 3]
    for s in stats:
        assert s["expert_counts"].shape == (4,) and not s["expert_counts"].requires_grad
        kept = int(s["expert_counts"].sum())
        assert kept <= 32 * 2 and s["dropped_fraction"] == pytest.approx(1 - kept / 64)
    (out.square().mean() + aux).backward()
    assert model.blocks[1].mlp.router.gate.weight.grad.abs().sum() > 0


def test_moe_with_gradient_checkpointing_matches():
    cfg = MoEConfig(num_experts=3, top_k=1, capacity_factor=0.0)
    torch.manual_seed(0)
    model = DiT(input_size=8, hidden_size=32, depth=2, num_heads=4, num_classes=10, moe=cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([1, 2])

    def grads():
        model.zero_grad()
        (model(x, t, y).square().mean() + model.moe_aux_loss()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.set_grad_checkpointing(1)
    for a, b in zip(plain, grads()):
        assert torch.allclose(a, b, atol=1e-6)


def test_flops_count_active_experts():
    cfg = {"num_experts": 8, "top_k": 2, "capacity_factor": 1.0}
    dense = DiT(input_size=8, hidden_size=32, depth=2, num_heads=4)
    moe = DiT(input_size=8, hidden_size=32, depth=2, num_heads=4, moe=cfg)
    ffn = 2 * 2 * 16 * 32 * 128  # fc1 + fc2 at T=16, D=32, hidden 128
    router = 2 * 16 * 32 * 8
    assert moe.flops_per_sample(False) - dense.flops_per_sample(False) == 2 * (ffn + router)


def test_dataclass_and_dict_configs_are_equivalent():
    a = DiT(input_size=8, hidden_size=32, depth=1, num_heads=4, moe=MoEConfig(num_experts=2, top_k=1))
    b = DiT(input_size=8, hidden_size=32, depth=1, num_heads=4, moe={"num_experts": 2, "top_k": 1})
    assert a.moe_config == b.moe_config
    assert set(a.state_dict()) == set(b.state_dict())
