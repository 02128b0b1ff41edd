"""MPDistil's student curriculum (stage 4): a policy over tasks trained with REINFORCE.

At curriculum step ``t`` the policy ``pi(a | s_t)`` picks a task ``a_t`` (its action space: ``curriculum.actions``, by
default the six SuperGLUE tasks), the student takes one optimizer step on a batch of that task, and the reward ``r_t``
compares the student with the meta-teacher on quiz data: 1 when the student's quiz accuracy is now higher, else 0
(``binary``), or the accuracy difference (``real``; :func:`mpdistil_fast.methods.mpdistil.reward`) (Sengupta et al.,
ICLR 2024, "A Good Learner can Teach Better: Teacher-Student Collaborative Knowledge Distillation", Sec. 3.4).  At the
end of an episode of ``T`` steps the policy follows REINFORCE (Williams, 1992, "Simple Statistical Gradient-Following
Algorithms for Connectionist Reinforcement Learning", Machine Learning 8) with a baseline ``b_t``::

    G_t = sum_{k=t}^{T-1} gamma^(k-t) r_k,        loss = -sum_t log pi(a_t | s_t) (G_t - b_t)

``b_t`` is an exponential moving average of past episodes' return at step ``t``, updated after each episode's policy
step as ``b_t <- d b_t + (1 - d) G_t`` (``d = baseline_decay``): ``G_t`` sums the ``T - t`` rewards still to come, so a
single baseline for every step would push up the first actions of each episode and down the last ones whatever they
earned.  The first episode (and one whose length differs from the last) uses its own mean return,
``b_t = mean_k G_k``.  (``reference_compat`` weights by ``gamma^k`` instead: :func:`discounted_returns`.)  The state
is detached from the student (a summary of recent quiz performance), so the policy's gradient never reaches the
student.  Because the policy does
not change inside an episode, the log-probabilities are recomputed from the stored ``(s_t, a_t)`` at the episode's
end: an episode in progress is plain data (states, actions, rewards) and can be checkpointed at any step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


def discounted_returns(rewards: list[float] | torch.Tensor, gamma: float, *, relative: bool = True) -> torch.Tensor:
    """Per-step returns of an episode's rewards ``r_0 .. r_{T-1}`` (float64 ``[T]``): ``G_t = sum_{k>=t}
    gamma^(k-t) r_k`` (``relative``), or the released code's ``sum_{k>=t} gamma^k r_k`` (= gamma^t G_t).

    Example::

        >>> discounted_returns([1.0, 0.0, 1.0], gamma=0.5)
        tensor([1.2500, 0.5000, 1.0000], dtype=torch.float64)
        >>> discounted_returns([1.0, 0.0, 1.0], gamma=0.5, relative=False)
        tensor([1.2500, 0.2500, 0.2500], dtype=torch.float64)
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    returns = torch.zeros_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    if not relative:  # gamma^k r_k summed from t: the relative return scaled by gamma^t
        returns = returns * gamma ** torch.arange(len(rewards), dtype=torch.float64)
    return returns


class CurriculumPolicy(nn.Module):
    """``pi(a | s) = softmax(W2 tanh(W1 s + b1) + b2)`` over ``actions`` (task names): a ``state_dim``-wide state,
    a ``hidden``-wide tanh layer; W2 and b2 start at zero, so the first policy is uniform over the tasks."""

    def __init__(self, state_dim: int, actions: list[str] | tuple[str, ...], hidden: int = 32) -> None:
        super().__init__()
        if state_dim <= 0:
            raise ValueError(f"state_dim must be > 0, got {state_dim}")
        if not actions:
            raise ValueError("actions must name at least one task")
        self.actions = tuple(actions)
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, len(self.actions)))
        nn.init.zeros_(self.net[2].weight)  # start from the uniform distribution over tasks
        nn.init.zeros_(self.net[2].bias)

    def distribution(self, state: torch.Tensor) -> torch.distributions.Categorical:
        """pi(. | state) for a ``[state_dim]`` state (or a ``[N, state_dim]`` batch of them), differentiable."""
        return torch.distributions.Categorical(logits=self.net(state.to(self.net[0].weight.dtype)))

    def probabilities(self, state: torch.Tensor) -> dict[str, float]:
        """``{task: pi(task | state)}`` for one state (for logs)."""
        with torch.no_grad():
            probs = self.distribution(state).probs
        return {a: float(p) for a, p in zip(self.actions, probs.reshape(-1, len(self.actions))[0])}


@dataclass
class Episode:
    """The data of an episode in progress: enough to recompute the policy loss at its end."""

    states: list[torch.Tensor] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    attached_states: list[torch.Tensor] = field(default_factory=list)  #: reference_compat only, never saved

    def __len__(self) -> int:
        return len(self.actions)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The episode as tensors (``states [T, state_dim]``, ``actions [T]``, ``rewards [T]``; ``{}`` when empty)
        for a checkpoint; the attached states are not saved."""
        if not self.actions:
            return {}
        return {"states": torch.stack(self.states), "actions": torch.tensor(self.actions, dtype=torch.long),
                "rewards": torch.tensor(self.rewards, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Episode":
        """The episode :meth:`to_tensors` saved."""
        if not tensors:
            return cls()
        return cls(list(tensors["states"].unbind(0)), tensors["actions"].tolist(), tensors["rewards"].tolist())


class Reinforce:
    """REINFORCE with a moving-average baseline for a :class:`CurriculumPolicy`.

    Args:
        policy: the policy it trains (with its own Adam optimizer of learning rate ``lr``).
        gamma: discount in (0, 1] of :func:`discounted_returns`.
        baseline_decay: decay d in [0, 1) of the per-step baseline ``b_t <- d b_t + (1 - d) G_t``.
        relative_discount: ``False`` reproduces the released code's ``gamma^k`` weighting (``reference_compat``).

    Per step call :meth:`act` then :meth:`reward`; at the end of an episode :meth:`finish_episode`.
    """

    def __init__(self, policy: CurriculumPolicy, *, lr: float, gamma: float, baseline_decay: float = 0.9,
                 relative_discount: bool = True) -> None:
        self.policy = policy
        self.gamma = gamma
        self.baseline_decay = baseline_decay
        self.relative_discount = relative_discount
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        #: b_t per step of an episode (float64; a 0-dim tensor is one baseline for every step)
        self.baseline: torch.Tensor | None = None
        self.episode = Episode()

    def act(self, state: torch.Tensor, *, keep_graph: bool = False,
            agree: Callable[[int], int] | None = None) -> int:
        """Sample an action for ``state`` (recorded in the current episode); uses the global torch RNG.

        ``keep_graph`` (the released code's choice, ``reference_compat``) keeps ``state`` attached to the student,
        so the policy loss also back-propagates into the student; such an episode cannot be checkpointed midway.
        ``agree`` maps the sampled action to the one every rank records (data parallel: rank 0's).
        """
        with torch.no_grad():
            action = int(self.policy.distribution(state.detach()).sample())
        if agree is not None:
            action = agree(action)
        if keep_graph:
            self.episode.attached_states.append(state.float())
        self.episode.states.append(state.detach().float())
        self.episode.actions.append(action)
        return action

    def reward(self, value: float) -> None:
        """Record the reward of the last :meth:`act` (RuntimeError when that action already has one)."""
        if len(self.episode.rewards) >= len(self.episode.actions):
            raise RuntimeError("reward() must follow an act()")
        self.episode.rewards.append(float(value))

    def finish_episode(self) -> dict[str, float]:
        """One policy-gradient step on the finished episode, ``loss = -sum_t log pi(a_t | s_t) (G_t - b_t)`` (module
        docstring), then the baseline update; returns the statistics (``policy_loss``, ``mean_reward``,
        ``mean_return``, ``baseline``, ``action_<task>`` counts) and starts a new episode."""
        episode = self.episode
        if len(episode) == 0 or len(episode.rewards) != len(episode):
            raise RuntimeError("finish_episode() needs an episode whose every action has a reward")
        returns = discounted_returns(episode.rewards, self.gamma, relative=self.relative_discount)
        baseline = None if self.baseline is None else torch.as_tensor(self.baseline, dtype=torch.float64)
        if baseline is None or baseline.dim() > 0 and baseline.numel() != len(returns):
            baseline = returns.mean()
        advantages = (returns - baseline).float()
        states = torch.stack(episode.attached_states or episode.states)
        log_probs = self.policy.distribution(states).log_prob(torch.tensor(episode.actions))
        loss = -(log_probs * advantages).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        mean_return = float(returns.mean())
        self.baseline = self.baseline_decay * baseline + (1.0 - self.baseline_decay) * returns
        counts = torch.bincount(torch.tensor(episode.actions), minlength=len(self.policy.actions))
        stats = {"policy_loss": float(loss.detach()), "mean_reward": sum(episode.rewards) / len(episode),
                 "mean_return": mean_return, "baseline": float(baseline.mean()),
                 **{f"action_{a}": int(c) for a, c in zip(self.policy.actions, counts)}}
        self.episode = Episode()
        return stats

    def state_dict(self) -> dict:
        """Policy, optimizer, baseline and the episode in progress (a checkpoint at any step)."""
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline, "episode": self.episode.to_tensors()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = None if state["baseline"] is None else torch.as_tensor(state["baseline"], dtype=torch.float64)
        self.episode = Episode.from_tensors(state["episode"])
