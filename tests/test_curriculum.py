"""The REINFORCE curriculum: returns, baseline, learning toward the rewarding task, checkpointable episodes."""
from __future__ import annotations

import pytest
import torch

from mpdistil_fast.methods import CurriculumPolicy, Episode, Reinforce, discounted_returns
from mpdistil_fast.methods.mpdistil import performance_state, reward, state_size, update_summary

TASKS = ("boolq", "cb", "copa", "rte", "wic", "wsc")


def test_discounted_returns_match_definition():
    rewards = torch.rand(7, dtype=torch.float64).tolist()
    gamma = 0.9
    expected = [sum(gamma ** (k - t) * rewards[k] for k in range(t, 7)) for t in range(7)]
    torch.testing.assert_close(discounted_returns(rewards, gamma), torch.tensor(expected, dtype=torch.float64))
    released = [sum(gamma ** k * rewards[k] for k in range(t, 7)) for t in range(7)]  # the released code's gamma^k
    torch.testing.assert_close(discounted_returns(rewards, gamma, relative=False),
                               torch.tensor(released, dtype=torch.float64))
    assert discounted_returns([1.0, 0.0, 0.0], 0.5).tolist() == [1.0, 0.0, 0.0]
    assert discounted_returns([0.0, 0.0, 1.0], 0.5).tolist() == [0.25, 0.5, 1.0]


def _train(reinforce: Reinforce, state_fn, reward_fn, episodes: int, steps: int) -> None:
    for _ in range(episodes):
        for t in range(steps):
            action = reinforce.act(state_fn(t))
            reinforce.reward(reward_fn(action))
        reinforce.finish_episode()


def test_policy_moves_toward_the_rewarding_task():
    """Constructed case: training on 'rte' beats the meta-teacher 80 % of the time, every other task 20 %."""
    torch.manual_seed(0)
    policy = CurriculumPolicy(state_size(2), TASKS, hidden=16)
    reinforce = Reinforce(policy, lr=0.05, gamma=0.9, baseline_decay=0.8)
    state = performance_state({"cb": [0.5, 0.6], "rte": [0.4, 0.5]}, ["cb", "rte"], 0.0)
    before = policy.probabilities(state)
    assert max(abs(p - 1 / 6) for p in before.values()) < 1e-6  # starts uniform
    good = TASKS.index("rte")
    _train(reinforce, lambda t: state, lambda a: float(torch.rand(()) < (0.8 if a == good else 0.2)),
           episodes=40, steps=8)
    after = policy.probabilities(state)
    assert after["rte"] > 0.6, after
    assert all(after["rte"] > 2 * p for task, p in after.items() if task != "rte")


def test_policy_uses_the_state():
    """Which task pays depends on the state: the policy learns a state-dependent choice."""
    torch.manual_seed(0)
    policy = CurriculumPolicy(2, ("cb", "rte"), hidden=16)
    reinforce = Reinforce(policy, lr=0.05, gamma=0.5)
    states = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    _train(reinforce, lambda t: states[t % 2], lambda a: float(a == len(reinforce.episode.rewards) % 2),
           episodes=60, steps=4)
    assert policy.probabilities(states[0])["cb"] > 0.7
    assert policy.probabilities(states[1])["rte"] > 0.7


def test_baseline_and_statistics():
    torch.manual_seed(0)
    reinforce = Reinforce(CurriculumPolicy(3, ("cb", "rte")), lr=0.01, gamma=1.0, baseline_decay=0.5)
    for value in (1.0, 0.0, 1.0):
        reinforce.act(torch.zeros(3))
        reinforce.reward(value)
    stats = reinforce.finish_episode()
    assert stats["mean_return"] == pytest.approx((2 + 1 + 1) / 3)
    assert stats["baseline"] == pytest.approx(4 / 3)  # first episode: its own mean
    assert stats["action_cb"] + stats["action_rte"] == 3
    # then one baseline per step: the moving average of each step's return
    torch.testing.assert_close(reinforce.baseline,
                               0.5 * 4 / 3 + 0.5 * torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    for _ in range(3):
        reinforce.act(torch.zeros(3))
        reinforce.reward(0.0)
    stats = reinforce.finish_episode()
    assert stats["baseline"] == pytest.approx(4 / 3)  # the mean of (5/3, 7/6, 7/6)
    torch.testing.assert_close(reinforce.baseline, torch.tensor([5 / 6, 7 / 12, 7 / 12], dtype=torch.float64))
    reinforce.act(torch.zeros(3))  # an episode of another length: its own mean again
    reinforce.reward(1.0)
    assert reinforce.finish_episode()["baseline"] == pytest.approx(1.0)


def test_a_checkpoint_s_single_baseline_loads_and_becomes_per_step():
    """Checkpoints written before per-step baselines hold one float: it serves every step of the next episode, whose
    returns then give each step its own."""
    reinforce = Reinforce(CurriculumPolicy(3, ("cb", "rte")), lr=0.01, gamma=1.0, baseline_decay=0.5)
    state = reinforce.state_dict()
    reinforce.load_state_dict({**state, "baseline": 0.5})
    for value in (1.0, 0.0):
        reinforce.act(torch.zeros(3))
        reinforce.reward(value)
    assert reinforce.finish_episode()["baseline"] == pytest.approx(0.5)
    torch.testing.assert_close(reinforce.baseline, torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_equal_rewards_teach_the_policy_nothing():
    """Every action earns the same: each step's baseline converges to its return G_t (larger for early steps, which
    have more rewards ahead), the advantages to 0 and the policy loss with them (a single baseline for all steps
    would keep favouring whatever came first in an episode)."""
    torch.manual_seed(0)
    reinforce = Reinforce(CurriculumPolicy(3, ("cb", "rte")), lr=0.05, gamma=0.9, baseline_decay=0.5)
    for _ in range(30):
        for _ in range(4):
            reinforce.act(torch.ones(3))
            reinforce.reward(1.0)
        stats = reinforce.finish_episode()
    assert abs(stats["policy_loss"]) < 1e-6, stats
    torch.testing.assert_close(reinforce.baseline, discounted_returns([1.0] * 4, 0.9))


def test_policy_gradient_equals_reinforce_formula():
    torch.manual_seed(0)
    policy = CurriculumPolicy(4, ("a", "b", "c"), hidden=5)
    torch.nn.init.normal_(policy.net[2].weight)
    reinforce = Reinforce(policy, lr=1e-3, gamma=0.8, baseline_decay=0.9)
    reinforce.baseline = 0.3
    states = [torch.randn(4) for _ in range(3)]
    for s, r in zip(states, (0.0, 1.0, 0.5)):
        reinforce.act(s)
        reinforce.reward(r)
    actions = list(reinforce.episode.actions)
    reference = CurriculumPolicy(4, ("a", "b", "c"), hidden=5).double()
    reference.load_state_dict(policy.state_dict())
    returns = [0.0 + 0.8 * 1.0 + 0.64 * 0.5, 1.0 + 0.8 * 0.5, 0.5]
    loss = -sum(reference.distribution(s.double()).log_prob(torch.tensor(a)) * (g - 0.3)
                for s, a, g in zip(states, actions, returns))
    loss.backward()
    reinforce.optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # keep parameters, inspect gradients
    reinforce.finish_episode()
    for ours, theirs in zip(policy.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-6)


def test_episode_in_progress_survives_a_checkpoint():
    torch.manual_seed(0)
    policy = CurriculumPolicy(3, ("cb", "rte"))
    reinforce = Reinforce(policy, lr=0.1, gamma=0.9)
    for t in range(3):
        reinforce.act(torch.randn(3))
        reinforce.reward(float(t))
    saved = reinforce.state_dict()
    clone = Reinforce(CurriculumPolicy(3, ("cb", "rte")), lr=0.1, gamma=0.9)
    clone.load_state_dict(saved)
    assert len(clone.episode) == 3 and clone.episode.rewards == [0.0, 1.0, 2.0]
    reinforce.finish_episode()
    clone.finish_episode()
    for a, b in zip(reinforce.policy.parameters(), clone.policy.parameters()):
        torch.testing.assert_close(a, b)
    assert Episode.from_tensors({}).actions == []


def test_detached_state_and_compat_attached_state():
    weight = torch.ones(3, requires_grad=True)
    reinforce = Reinforce(CurriculumPolicy(3, ("cb", "rte")), lr=0.1, gamma=0.9)
    reinforce.act(weight * 2)
    reinforce.reward(1.0)
    reinforce.act(weight * 3)
    reinforce.reward(0.0)
    reinforce.finish_episode()
    assert weight.grad is None  # the policy loss never reaches the student
    reinforce.act(weight * 2, keep_graph=True)  # reference_compat: the released code's undetached state
    reinforce.reward(1.0)
    reinforce.act(weight * 3, keep_graph=True)
    reinforce.reward(0.0)
    torch.nn.init.normal_(reinforce.policy.net[2].weight)
    reinforce.finish_episode()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_misuse_is_reported():
    reinforce = Reinforce(CurriculumPolicy(2, ("cb",)), lr=0.1, gamma=0.9)
    with pytest.raises(RuntimeError, match="reward"):
        reinforce.reward(1.0)
    with pytest.raises(RuntimeError, match="finish_episode"):
        reinforce.finish_episode()
    with pytest.raises(ValueError, match="state_dim"):
        CurriculumPolicy(0, ("cb",))
    with pytest.raises(ValueError, match="actions"):
        CurriculumPolicy(2, ())


def test_reward_and_state():
    assert reward(0.7, 0.6, "binary") == 1.0 and reward(0.6, 0.6, "binary") == 0.0
    assert reward(0.5, 0.75, "real") == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="kind"):
        reward(0.5, 0.5, "dense")
    summary = {"cb": [0.0, 0.0], "rte": [0.0, 0.0]}
    update_summary(summary, "cb", 1.0, 0.5, decay=0.5)
    state = performance_state(summary, ["cb", "rte"], 0.25)
    assert state.tolist() == [0.5, 0.25, 0.25, 0.0, 0.0, 0.0, 0.25]
    assert state.shape == (state_size(2),) and not state.requires_grad


def test_the_baseline_keeps_baseline_decay_of_its_past():
    """b_t <- decay * b_t + (1 - decay) * G_t with an asymmetric decay (0.9): the tests above use 0.5, where the
    two weights are interchangeable."""
    reinforce = Reinforce(CurriculumPolicy(3, ("cb", "rte")), lr=0.01, gamma=1.0, baseline_decay=0.9)
    for value in (1.0, 0.0):
        reinforce.act(torch.zeros(3))
        reinforce.reward(value)
    assert reinforce.finish_episode()["baseline"] == pytest.approx(0.5)  # returns (1, 0): their mean
    torch.testing.assert_close(reinforce.baseline, torch.tensor([0.9 * 0.5 + 0.1 * 1.0, 0.9 * 0.5 + 0.1 * 0.0],
                                                                dtype=torch.float64))
    for _ in range(2):
        reinforce.act(torch.zeros(3))
        reinforce.reward(0.0)
    assert reinforce.finish_episode()["baseline"] == pytest.approx(0.5)
    torch.testing.assert_close(reinforce.baseline, torch.tensor([0.9 * 0.55, 0.9 * 0.45], dtype=torch.float64))


def test_the_summary_s_moving_average_keeps_seven_tenths_of_its_past():
    """update_summary's default decay (the one the curriculum stage uses) weights the old value by 0.7."""
    summary = {"cb": [0.0, 1.0]}
    update_summary(summary, "cb", 1.0, 0.0)
    assert summary["cb"] == pytest.approx([0.3, 0.7])
    update_summary(summary, "cb", 1.0, 0.0)
    assert summary["cb"] == pytest.approx([0.7 * 0.3 + 0.3, 0.7 * 0.7])
