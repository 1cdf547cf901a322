"""Balance losses (paper Eqs. 23-31) against hand-computed values, and device-level token dropping (§2.2.4)."""

from __future__ import annotations

import pytest
import torch

from dsv2.train.balance import balance_losses, drop_tokens, protected_sequences

# One sequence, T=3 tokens, E=4 experts, K=2 per token, D=2 devices (experts {0,1} on device 0, {2,3} on 1), M=1.
# Each token's selection is the top-2 of its scores.
HAND_SCORES = torch.tensor([[
    [0.4, 0.3, 0.2, 0.1],  # t0 -> {0,1}: device 0 only
    [0.4, 0.1, 0.2, 0.3],  # t1 -> {0,3}: devices 0 and 1
    [0.5, 0.1, 0.3, 0.1],  # t2 -> {0,2}: devices 0 and 1
]])
HAND_INDICES = torch.tensor([[[0, 1], [0, 3], [0, 2]]])
# counts [3,1,1,1]       -> f = 4/(2·3)·counts = [2, 2/3, 2/3, 2/3]                        (Eq. 24)
# score sums [1.3,.5,.7,.5] -> P = [13, 5, 7, 5]/30                                          (Eq. 25)
# expert: Σ f P = (2·13 + 2/3·17)/30 = 112/90 = 56/45                                        (Eq. 23)
# device: f' = [4/3, 2/3], P' = [18, 12]/30 -> 4/3·0.6 + 2/3·0.4 = 16/15                     (Eqs. 26-28)
# comm: tokens received [3, 2] -> f'' = 2/(1·3)·[3, 2] = [2, 4/3] -> 2·0.6 + 4/3·0.4 = 26/15  (Eqs. 29-31)
HAND = {"expert": 56 / 45, "device": 16 / 15, "comm": 26 / 15}


def losses_of(scores, indices, alphas=(1.0, 1.0, 1.0), **kw):
    a1, a2, a3 = alphas
    kw = {"n_devices": 2, "topk_devices": 1, **kw}
    return balance_losses(scores, indices, alpha_expert=a1, alpha_device=a2, alpha_comm=a3, **kw)


def test_losses_match_hand_computation():
    losses, stats = losses_of(HAND_SCORES, HAND_INDICES)
    for name, value in HAND.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-6), name
    assert losses["total"].item() == pytest.approx(sum(HAND.values()), rel=1e-6)
    torch.testing.assert_close(stats["expert_load"], torch.tensor([3, 1, 1, 1]) / 6)
    torch.testing.assert_close(stats["device_load"], torch.tensor([4, 2]) / 6)
    assert stats["load_max_over_min"].item() == pytest.approx(3.0)
    assert stats["load_max_over_mean"].item() == pytest.approx(2.0)

    # the α's scale each loss (V2's values, paper §3.1.2)
    scaled, _ = losses_of(HAND_SCORES, HAND_INDICES, alphas=(0.003, 0.05, 0.02))
    for name, alpha in (("expert", 0.003), ("device", 0.05), ("comm", 0.02)):
        assert scaled[name].item() == pytest.approx(alpha * HAND[name], rel=1e-6)


def test_one_device_has_only_the_expert_loss():
    losses, stats = losses_of(HAND_SCORES, HAND_INDICES, n_devices=1)
    assert losses["expert"].item() == pytest.approx(HAND["expert"], rel=1e-6)
    assert losses["device"].item() == losses["comm"].item() == 0.0
    assert stats["device_load"].tolist() == [1.0]


def test_padding_is_excluded_and_sequences_are_averaged():
    # sequence 0: the hand example plus one padding token with arbitrary routing;
    # sequence 1: a different, fully real sequence; sequence 2: all padding (left out of the mean)
    other_scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.2, 0.2], [0.1, 0.6, 0.2, 0.1],
                                 [0.2, 0.2, 0.5, 0.1]])
    other_indices = torch.tensor([[3, 2], [0, 1], [1, 2], [2, 0]])
    pad_scores, pad_indices = torch.tensor([[0.7, 0.1, 0.1, 0.1]]), torch.tensor([[0, 1]])
    scores = torch.stack([torch.cat([HAND_SCORES[0], pad_scores]), other_scores, other_scores.flip(0)])
    indices = torch.stack([torch.cat([HAND_INDICES[0], pad_indices]), other_indices, other_indices])
    mask = torch.tensor([[True, True, True, False], [True] * 4, [False] * 4])

    batched, stats = losses_of(scores, indices, mask=mask)
    alone, _ = losses_of(other_scores[None], other_indices[None])
    for name in ("expert", "device", "comm"):
        expected = (HAND[name] + alone[name].item()) / 2
        assert batched[name].item() == pytest.approx(expected, rel=1e-6), name
    # load statistics count real slots of the whole batch: 6 from sequence 0, 8 from sequence 1
    torch.testing.assert_close(stats["expert_load"], torch.tensor([3 + 2, 1 + 2, 1 + 3, 1 + 1]) / 14)


def test_balanced_routing_gives_alpha():
    # two tokens with uniform scores, together covering every expert once and each device once:
    # f_i = 1, P_i = 1/4; f'_d = 1, P'_d = 1/2; f''_d = 2/(1·2)·1 = 1 -> every Σ f·P is 1
    scores = torch.full((1, 2, 4), 0.25)
    indices = torch.tensor([[[0, 1], [2, 3]]])
    losses, stats = losses_of(scores, indices, alphas=(0.003, 0.05, 0.02))
    assert losses["expert"].item() == pytest.approx(0.003)
    assert losses["device"].item() == pytest.approx(0.05)
    assert losses["comm"].item() == pytest.approx(0.02)
    assert stats["load_max_over_min"].item() == pytest.approx(1.0)


def random_routing(batch=2, seq=16, n_experts=8, top_k=2, requires_grad=True):
    logits = torch.randn(batch, seq, n_experts, requires_grad=requires_grad)
    scores = logits.softmax(dim=-1)
    weights, indices = scores.detach().topk(top_k, dim=-1)
    return logits, scores, weights, indices


def hand_gradient(name, indices, n_experts, n_devices, topk_devices, alpha):
    """dL/ds_{b,t,i} of one balance loss, counted token by token. Each loss is α/B Σ_b Σ_x f_{b,x} P_{b,x}
    with f a constant count and P a sum of (1/T) Σ_t s_{b,t,i} over the experts i of x (an expert, or a
    device's experts), so dL/ds_{b,t,i} = α f_{b,x(i)} / (T·B) for the x that expert i belongs to."""
    batch, seq, top_k = indices.shape
    per_device = n_experts // n_devices
    f = torch.zeros(batch, n_experts)  # f_{b,x(i)}, written per expert i
    for b in range(batch):
        chosen = [set(indices[b, t].tolist()) for t in range(seq)]
        expert_f = [n_experts / (top_k * seq) * sum(i in c for c in chosen) for i in range(n_experts)]  # Eq. 24
        for i in range(n_experts):
            d = i // per_device
            on_d = range(d * per_device, (d + 1) * per_device)
            if name == "expert":
                f[b, i] = expert_f[i]
            elif name == "device":  # Eq. 27: the mean f of the device's experts
                f[b, i] = sum(expert_f[j] for j in on_d) / per_device
            else:  # Eq. 30: D/(M·T) × the tokens with at least one expert on the device
                f[b, i] = n_devices / (topk_devices * seq) * sum(any(j in c for j in on_d) for c in chosen)
    return (alpha * f / (seq * batch)).unsqueeze(1).expand(batch, seq, n_experts)


@pytest.mark.parametrize("name", ["expert", "device", "comm"])
def test_each_loss_gradient_equals_hand_computation(name):
    """The gradient reaches the router's logits through P only, with the value the formula gives."""
    logits, scores, _, indices = random_routing(batch=3, seq=5)
    scores.retain_grad()
    alphas = {"alpha_expert": 0.5, "alpha_device": 0.25, "alpha_comm": 0.125}
    losses, _ = balance_losses(scores, indices, n_devices=4, topk_devices=2, **alphas)
    losses[name].backward()
    expected = hand_gradient(name, indices, 8, 4, 2, alphas[f"alpha_{name}"])
    torch.testing.assert_close(scores.grad, expected)
    # through the softmax: dL/du_j = s_j (g_j - Σ_i s_i g_i)
    s = scores.detach()
    torch.testing.assert_close(logits.grad, s * (expected - (s * expected).sum(-1, keepdim=True)))


# token dropping: E=4, D=2 (experts {0,1} on device 0), one sequence of 3 tokens, K=2 -> 6 slots,
# capacity factor 1.0 -> 3 slots per device. Device 0 gets 5 slots with affinities .4 .3 .4 .5 .1 and keeps
# the top 3 (.5 .4 .4); device 1 gets 1 slot and keeps it.
DROP_INDICES = torch.tensor([[[0, 1], [0, 3], [0, 1]]])
DROP_AFFINITY = torch.tensor([[[0.4, 0.3], [0.4, 0.3], [0.5, 0.1]]])


def test_drop_hand_example():
    keep, dropped = drop_tokens(DROP_AFFINITY, DROP_INDICES, n_experts=4, n_devices=2,
                                protected=torch.tensor([False]))
    assert keep.tolist() == [[[True, False], [True, True], [True, False]]]
    assert dropped.item() == pytest.approx(2 / 6)


def test_protected_slots_use_capacity_first():
    # a protected second sequence puts 5 slots on device 0; capacity is 12/2 = 6, so device 0 admits just one
    # unprotected slot (the .5), and device 1 (1 protected slot) keeps the unprotected one it gets
    indices = torch.cat([DROP_INDICES, torch.tensor([[[0, 1], [1, 0], [0, 2]]])])
    affinity = torch.cat([DROP_AFFINITY, torch.full((1, 3, 2), 0.01)])
    keep, dropped = drop_tokens(affinity, indices, n_experts=4, n_devices=2, protected=torch.tensor([False, True]))
    assert keep[0].tolist() == [[False, False], [False, True], [True, False]]
    assert keep[1].all()
    assert dropped.item() == pytest.approx(4 / 12)


def device_loads(keep, indices, n_devices, per_device):
    return torch.bincount((indices // per_device)[keep], minlength=n_devices)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_drop_respects_capacity_keeps_best_and_protected(factor):
    batch, seq, n_experts, top_k, n_devices = 10, 24, 8, 3, 4
    _, _, affinity, indices = random_routing(batch, seq, n_experts, top_k, requires_grad=False)
    # skew the load so that some devices overflow
    indices = torch.where(torch.rand(indices.shape) < 0.3, indices % 2, indices)
    protected = torch.zeros(batch, dtype=torch.bool)
    protected[[1, 6]] = True
    keep, dropped = drop_tokens(affinity, indices, n_experts=n_experts, n_devices=n_devices,
                                capacity_factor=factor, protected=protected)
    assert keep[protected].all()
    capacity = -(-int(factor * batch * seq * top_k) // n_devices)
    device_of = indices // (n_experts // n_devices)
    protected_slots = protected[:, None, None].expand_as(indices)
    kept = device_loads(keep, indices, n_devices, n_experts // n_devices)
    safe = device_loads(protected_slots, indices, n_devices, n_experts // n_devices)
    offered = device_loads(torch.ones_like(keep), indices, n_devices, n_experts // n_devices)
    # each device keeps its protected slots, then fills its remaining budget, never more
    torch.testing.assert_close(kept, torch.maximum(safe, torch.minimum(offered, torch.full_like(safe, capacity))))
    assert kept.max() > 0 and dropped.item() == pytest.approx(1 - kept.sum().item() / indices.numel())
    for d in range(n_devices):
        on_d = (device_of == d) & ~protected_slots
        kept_aff, dropped_aff = affinity[on_d & keep], affinity[on_d & ~keep]
        if kept_aff.numel() and dropped_aff.numel():
            assert kept_aff.min() >= dropped_aff.max()


def test_padding_takes_no_capacity_and_is_dropped():
    # padding the middle token out: 4 real slots -> capacity 2 per device; device 0 has 3 real slots (.4 .5 .1)
    mask = torch.tensor([[True, False, True]])
    keep, dropped = drop_tokens(DROP_AFFINITY, DROP_INDICES, n_experts=4, n_devices=2,
                                protected=torch.tensor([False]), mask=mask)
    assert keep.tolist() == [[[True, False], [False, False], [True, False]]]
    assert dropped.item() == pytest.approx(2 / 4)


def test_nothing_dropped_in_eval_or_without_capacity():
    for kwargs in ({"training": False}, {"capacity_factor": None}):
        keep, dropped = drop_tokens(DROP_AFFINITY, DROP_INDICES, n_experts=4, n_devices=2, **kwargs)
        assert keep.all() and keep.shape == DROP_INDICES.shape and dropped.item() == 0.0
    keep, dropped = drop_tokens(DROP_AFFINITY, DROP_INDICES, n_experts=4, n_devices=2, capacity_factor=2.0)
    assert keep.all() and dropped.item() == 0.0


def test_protected_sequences_are_seeded_and_about_ten_percent():
    draw = [protected_sequences(20_000, 0.1, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    assert 0.09 < draw[0].float().mean().item() < 0.11
    # the same generator seed protects the same sequences inside drop_tokens
    indices = torch.zeros(8, 2, 1, dtype=torch.long)  # everything on device 0: only protected slots survive
    affinity = torch.rand(8, 2, 1)
    keep, _ = drop_tokens(affinity, indices, n_experts=2, n_devices=2, capacity_factor=0.01, protect_fraction=0.5,
                          generator=torch.Generator().manual_seed(3))
    expected = protected_sequences(8, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(keep[:, :, 0].all(dim=1) & expected, expected)
