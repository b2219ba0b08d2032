"""envs/tutor_judge.py: a preference over tutor conversations that no reward represents, and its game solved exactly.

`--tutor_judge majority` (docs/mtpo.md#a-judge-no-reward-represents) replaces the tutor's default judge
sigmoid(4 (r(a) - r(b))) by a panel of three criteria of a whole conversation, each voting for the conversation that
does better on it and abstaining on a tie:
  learning   more lessons learned
  time       fewer teacher turns spent asking
  progress   the first lesson learned earlier (a conversation with none counts H + 1)
The conversation with more votes is preferred (P = 1), equal votes tie (P = 1/2). Majority votes over three
orderings cycle (Condorcet): a > b > c > a happens for three conversations (`CYCLE`), so no reward r with
P(a > b) > 1/2 exactly when r(a) > r(b) exists. The cycle reaches policies too: never asking beats asking once,
asking once beats asking until the style is named, which beats never asking (all switching style after a failed
lesson; `FAMILY`).

Exact machinery (the student's replies are random; a teacher is any function of the dialogue so far):
  outcome_distribution   a teacher's distribution of criteria (learned, asks, first) per student patience, by
                         enumerating every dialogue (styles averaged: the teacher's style labels relabelled at
                         random, as a sampling policy's guesses are)
  policy_preference      P(pi > pi') = E_student E[vote(c, c')], c ~ pi and c' ~ pi' with the same student
  expectimax             the best teacher for a terminal payoff of (patience, criteria): expectimax over beliefs on
                         the hidden (style, patience, patience left), the criteria so far in the state
  solve_game             the Nash equilibrium (von Neumann winner) over ALL teachers by double oracle: the restricted
                         game's equilibrium, then the exact best response to it, until no teacher beats it
  bradley_terry_reward   the judge's Bradley-Terry reward: r(c) = w . (learned, -asks, -first), fitted exactly on
                         the pairs of the scripted reference teacher (whom mu imitates; `BradleyTerryReward`)
With the majority judge the environment's reward is that Bradley-Terry reward (what REFUEL, Iterative PPO and
multi-turn RLHF with --reward exact maximise), its preference the panel's vote (what MTPO plays), and V* the best
expected Bradley-Terry reward.

    python -m envs.tutor_judge    # the family's matrix, the Nash, the Bradley-Terry fit and who beats whom
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import numpy as np
import torch

import simulator as sim
from envs.tutor_task import (ASK, ASLEEP, BORED, CONFUSED, LEARNED, NAMED, NEUTRAL, NOT_SURE, STYLES, TEACH,
                             TutorEnv, TutorRules, _obs_model, _reference_policy, belief_branches, lessons_learned,
                             parse_teacher)

ACTIONS = (-1, 0, 1, 2, 3, -2)  # ask, teach style 0..3, neither (the student is confused): every teacher turn's kind
OTHER_TEXT = "hello ."  # what a scripted teacher says for "neither"


# ---------------------------------------------------------------------------------------------------------------
# The panel's vote
# ---------------------------------------------------------------------------------------------------------------
def criteria(conv: sim.Conversation, max_turns: int) -> tuple[int, int, int]:
    """(lessons learned, turns spent asking, turn of the first lesson learned or H + 1) of a conversation."""
    learned = lessons_learned(conv)
    asks = sum(parse_teacher(m["content"])[0] == "ask" for m in conv if m["role"] == "assistant")
    first = next((h + 1 for h, x in enumerate(learned) if x), max_turns + 1)
    return sum(learned), asks, first


def vote(fa: Sequence[int], fb: Sequence[int]) -> float:
    """P(a > b) from criteria (learned, asks, first): one vote per criterion (more learned, fewer asks, earlier
    first lesson), none on a tie; more votes wins, equal votes tie."""
    votes = np.sign(fa[0] - fb[0]) + np.sign(fb[1] - fa[1]) + np.sign(fb[2] - fa[2])
    return 0.5 + 0.5 * float(np.sign(votes))


CYCLE = (  # three conversations' criteria with a > b > c > a: no reward orders them as the panel does
    (3, 2, 3),  # a: asked twice, then learned three lessons from turn 3
    (2, 0, 4),  # b: never asked, learned two lessons from turn 4
    (1, 1, 1),  # c: learned a lesson at turn 1, asked once, learned nothing more
)


class MajorityJudge:
    """The panel as a preference oracle: __call__(convs_a, convs_b) -> P(a > b) in {0, 1/2, 1} per pair."""

    def __init__(self, max_turns: int):
        self.max_turns = max_turns

    def __call__(self, convs_a, convs_b) -> torch.Tensor:
        return torch.tensor([vote(criteria(a, self.max_turns), criteria(b, self.max_turns))
                             for a, b in zip(convs_a, convs_b)], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Teachers as functions of the dialogue, and their exact distributions of criteria
# ---------------------------------------------------------------------------------------------------------------
# A teacher is policy(history) -> {action: probability}, history a tuple of (action, observation) pairs.
Teacher = Callable[[tuple], dict]


def _observations(rules: TutorRules, style: int, left: int, action: int) -> list:
    """[(observation, probability, patience left after)] of the student (style, left) to a teacher action."""
    if left > 0 and action == -2:
        return [("confused", 1.0, left)]
    return [(o, p, nxt[1]) for o, p, nxt in _obs_model(rules, (style, left), action)]


def outcome_distribution(teacher: Teacher, rules: TutorRules = TutorRules()) -> dict:
    """{patience: {(learned, asks, first): probability}}: every dialogue of the teacher with every student, styles
    averaged (the teacher's style labels relabelled by a random permutation, which the task cannot tell apart)."""
    H = rules.max_turns
    out = {p: {} for p in rules.patience}

    def walk(style, patience, left, history, learned, asks, first, prob):
        t = len(history) + 1
        if t > H:
            key = (learned, asks, first or H + 1)
            out[patience][key] = out[patience].get(key, 0.0) + prob / len(STYLES)
            return
        for a, pa in teacher(history).items():
            for o, po, nxt in _observations(rules, style, left, a):
                got = o == "learned"
                walk(style, patience, nxt, history + ((a, o),), learned + got, asks + (a == -1),
                     first or (t if got else 0), prob * pa * po)

    for style, patience in itertools.product(range(len(STYLES)), rules.patience):
        walk(style, patience, patience, (), 0, 0, 0, 1.0)
    return out


def policy_preference(da: dict, db: dict) -> float:
    """P(pi_a > pi_b): both play the same student (patience uniform; styles averaged in each distribution)."""
    total = 0.0
    for p in da:
        for fa, qa in da[p].items():
            for fb, qb in db[p].items():
                total += qa * qb * vote(fa, fb)
    return total / len(da)


def family_teacher(asks: int, switch: bool = True) -> Teacher:
    """Ask up to `asks` times until the student names its style, then teach it; without a named style guess in the
    order 0, 1, 2, 3, moving to the next style after an unlearned lesson (switch) or after every lesson."""
    def policy(history):
        named = [int(o[5:]) for _, o in history if o.startswith("named")]
        if named:
            return {named[0]: 1.0}
        if sum(a == -1 for a, _ in history) < asks:
            return {-1: 1.0}
        taught = [(a, o) for a, o in history if a >= 0]
        if not taught:
            return {0: 1.0}
        a, o = taught[-1]
        return {a if (switch and o == "learned") else (a + 1) % len(STYLES): 1.0}
    return policy


FAMILY = {"never ask": family_teacher(0), "ask once": family_teacher(1), "ask until named (2)": family_teacher(2)}


def reference_teacher(rules: TutorRules = TutorRules()) -> Teacher:
    """The scripted reference teacher (whom mu imitates) as a stochastic teacher."""
    def policy(history):
        t = len(history) + 1
        named = int(history[0][1][5:]) if history and history[0][1].startswith("named") else None
        last_a, last_o = history[-1] if history else (None, None)
        return _reference_policy(rules, t, (named, last_a, last_o))
    return policy


# ---------------------------------------------------------------------------------------------------------------
# Best responses by expectimax over beliefs, and the game's Nash by double oracle
# ---------------------------------------------------------------------------------------------------------------
class Expectimax:
    """The teacher maximising E[payoff(patience, (learned, asks, first))] over all teachers: expectimax over the
    belief on the hidden (style, patience, patience left), the criteria so far in the state. `policy` plays it
    (ties go to the first action in ACTIONS); `value` is its expected payoff."""

    def __init__(self, payoff: Callable[[int, tuple], float], rules: TutorRules = TutorRules()):
        self.payoff, self.rules, self.H = payoff, rules, rules.max_turns
        self.states = [(s, p, left) for s in range(len(STYLES)) for p in rules.patience for left in range(p + 1)]
        prior = 1 / (len(STYLES) * len(rules.patience))
        self.prior = tuple(prior if left == p else 0.0 for _, p, left in self.states)
        self.value = self._value(self.prior, 1, 0, 0, 0)

    @functools.lru_cache(maxsize=None)
    def _branches(self, belief: tuple, action: int) -> dict:
        """{observation: (probability, posterior)} after an action (the same for every criteria so far: cached)."""
        return belief_branches(self.states, belief, lambda st: [(o, q, (st[0], st[1], left)) for o, q, left in
                                                               _observations(self.rules, st[0], st[2], action)])

    @functools.lru_cache(maxsize=None)
    def _q(self, belief: tuple, t: int, learned: int, asks: int, first: int, action: int) -> float:
        total = 0.0
        for o, (q, post) in self._branches(belief, action).items():
            got = o == "learned"
            total += q * self._value(post, t + 1, learned + got, asks + (action == -1), first or (t if got else 0))
        return total

    @functools.lru_cache(maxsize=None)
    def _value(self, belief: tuple, t: int, learned: int, asks: int, first: int) -> float:
        if t > self.H:
            by_patience = {}
            for (_, p, _), b in zip(self.states, belief):
                by_patience[p] = by_patience.get(p, 0.0) + b
            return sum(b * self.payoff(p, (learned, asks, first or self.H + 1)) for p, b in by_patience.items()
                       if b > 0)
        return max(self._q(belief, t, learned, asks, first, a) for a in ACTIONS)

    def policy(self, history: tuple) -> dict:
        belief, learned, asks, first = self.prior, 0, 0, 0
        for t, (a, o) in enumerate(history, start=1):
            belief = self._branches(belief, a)[o][1]
            got = o == "learned"
            learned, asks, first = learned + got, asks + (a == -1), first or (t if got else 0)
        t = len(history) + 1
        q = [self._q(belief, t, learned, asks, first, a) for a in ACTIONS]
        return {ACTIONS[int(np.argmax(np.round(q, 12)))]: 1.0}


def restricted_nash(P: np.ndarray, iterations: int = 20000) -> np.ndarray:
    """The equilibrium of the symmetric zero-sum game with payoff P - 1/2 among a few teachers, by optimistic
    multiplicative weights (the averaged play); its exploitability is measured by the caller."""
    A = P - 0.5
    n = len(A)
    logits, prev, avg = np.zeros(n), np.zeros(n), np.zeros(n)
    lr = 2.0
    for _ in range(iterations):
        x = np.exp(logits - logits.max())
        x /= x.sum()
        avg += x
        gain = A @ x
        logits += lr * (2 * gain - prev)
        prev = gain
    avg /= iterations
    avg[avg < 1e-4] = 0.0
    return avg / avg.sum()


def mixture_distribution(dists: Sequence[dict], weights: Sequence[float]) -> dict:
    out = {p: {} for p in dists[0]}
    for d, w in zip(dists, weights):
        for p in d:
            for f, q in d[p].items():
                out[p][f] = out[p].get(f, 0.0) + w * q
    return out


def best_response(opponent: dict, rules: TutorRules = TutorRules()) -> Expectimax:
    """The teacher with the highest P(it > opponent) over all teachers (opponent: an outcome_distribution)."""
    def payoff(patience, f):
        return sum(q * vote(f, g) for g, q in opponent[patience].items())
    return Expectimax(payoff, rules)


@functools.lru_cache(maxsize=4)  # a few seconds each; the environment, evaluate.py and the tests ask again
def solve_game(rules: TutorRules = TutorRules(), tolerance: float = 1e-3, max_rounds: int = 20) -> dict:
    """Double oracle from FAMILY: the restricted game's Nash, the exact best response to it over all teachers, that
    teacher added, until the best response wins by at most `tolerance` (then no teacher beats the mixture by more).
    Returns the teachers, their distributions, the Nash weights, the Nash's own distribution and the best response's
    P against it."""
    names, teachers = list(FAMILY), list(FAMILY.values())
    dists = [outcome_distribution(t, rules) for t in teachers]
    for round_ in range(max_rounds):
        P = np.array([[policy_preference(a, b) for b in dists] for a in dists])
        weights = restricted_nash(P)
        nash = mixture_distribution(dists, weights)
        br = best_response(nash, rules)
        if br.value <= 0.5 + tolerance:
            break
        names.append(f"best response {round_ + 1}")
        teachers.append(br.policy)
        dists.append(outcome_distribution(br.policy, rules))
    return dict(names=names, teachers=teachers, dists=dists, matrix=P, weights=weights, nash=nash,
                exploitability=br.value - 0.5)


# ---------------------------------------------------------------------------------------------------------------
# The judge's Bradley-Terry reward
# ---------------------------------------------------------------------------------------------------------------
def features(f: Sequence[int]) -> np.ndarray:
    return np.array([f[0], -f[1], -f[2]], dtype=float)


def bradley_terry_reward(rules: TutorRules = TutorRules(), steps: int = 500) -> dict:
    """w maximising E[p log sigmoid(w.(x_a - x_b)) + (1 - p) log sigmoid(w.(x_b - x_a))] over the exact pairs of the
    scripted reference teacher's dialogues (same student), p the panel's vote, x = (learned, -asks, -first): Newton
    steps on a concave objective. Also its accuracy on the untied pairs (the fraction whose vote it gets right)."""
    d = outcome_distribution(reference_teacher(rules), rules)
    rows = [(features(fa) - features(fb), qa * qb / len(d), vote(fa, fb))
            for p in d for fa, qa in d[p].items() for fb, qb in d[p].items()]
    X = np.array([r[0] for r in rows])
    q = np.array([r[1] for r in rows])
    y = np.array([r[2] for r in rows])
    w = np.zeros(3)
    for _ in range(steps):
        s = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (q * (y - s))
        hess = -(X * (q * s * (1 - s))[:, None]).T @ X - 1e-9 * np.eye(3)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-12:
            break
    margin = X @ w
    untied = y != 0.5
    right = ((margin > 0) == (y > 0.5)) & untied
    return dict(weights=w, accuracy=float(q[right].sum() / q[untied].sum()))


def ranking_accuracy(score: Callable[[tuple], float], da: dict, db: dict) -> float:
    """The probability that a reward `score` of the criteria orders an untied pair (a ~ da, b ~ db, the same
    student) as the panel's vote does."""
    right = untied = 0.0
    for p in da:
        for fa, qa in da[p].items():
            for fb, qb in db[p].items():
                v = vote(fa, fb)
                if v != 0.5:
                    untied += qa * qb
                    right += qa * qb * ((score(fa) > score(fb)) == (v > 0.5))
    return right / untied


class BradleyTerryReward:
    """r(c) = w . (x(c) - x_0) / 4: the judge's Bradley-Terry reward in the default tutor judge's units (the fitted
    model is P(a > b) = sigmoid(4 (r(a) - r(b))), as the default judge is on the lessons), zero for a teacher who
    neither asks nor teaches (x_0 = (0, 0, -(H + 1)))."""

    def __init__(self, rules: TutorRules = TutorRules()):
        fit = bradley_terry_reward(rules)
        self.weights, self.accuracy, self.max_turns = fit["weights"], fit["accuracy"], rules.max_turns
        self.zero = features((0, 0, rules.max_turns + 1))

    def of_criteria(self, f: Sequence[int]) -> float:
        return float((features(f) - self.zero) @ self.weights / 4)

    def __call__(self, convs: Sequence[sim.Conversation]) -> torch.Tensor:
        return torch.tensor([self.of_criteria(criteria(c, self.max_turns)) for c in convs], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Playing a teacher in text (evaluate.py --scripted)
# ---------------------------------------------------------------------------------------------------------------
_REPLIES = {" ".join(LEARNED.split()): "learned", " ".join(NEUTRAL.split()): "neutral",
            " ".join(BORED.split()): "bored", " ".join(ASLEEP.split()): "asleep",
            " ".join(CONFUSED.split()): "confused", " ".join(NOT_SURE.split()): "notsure",
            **{" ".join(NAMED.format(s).split()): f"named{i}" for i, s in enumerate(STYLES)}}


def play_teachers(env, contexts: Sequence[sim.Context], teachers: Sequence[Teacher], weights: Sequence[float],
                  rng: np.random.Generator) -> list:
    """Whole dialogues of a mixture of teachers: per context a teacher drawn by weight and a random relabelling of
    its styles (a teacher's "style 0" is its first guess, not pictures), played with the environment's student."""
    n = len(contexts)
    pick = rng.choice(len(teachers), size=n, p=np.asarray(weights) / np.sum(weights))
    perms = [rng.permutation(len(STYLES)) for _ in range(n)]
    convs, users, histories = [list(c.messages) for c in contexts], [c.user for c in contexts], [()] * n
    for _ in range(env.max_turns):
        for i in range(n):
            probs = teachers[pick[i]](histories[i])
            a = list(probs)[rng.choice(len(probs), p=list(probs.values()))]
            text = ASK if a == -1 else OTHER_TEXT if a == -2 else TEACH.format(STYLES[perms[i][a]])
            convs[i].append({"role": "assistant", "content": text})
            histories[i] += ((a, None),)
        for i, reply in enumerate(env.user_turn(convs, users, rng)):
            convs[i].append({"role": "user", "content": reply})
            o = _REPLIES[" ".join(reply.split())]
            if o.startswith("named"):  # the named style in the teacher's own labels
                o = f"named{int(np.argmax(perms[i] == int(o[5:])))}"
            histories[i] = histories[i][:-1] + ((histories[i][-1][0], o),)
    return convs


# ---------------------------------------------------------------------------------------------------------------
# The tutor task under the panel
# ---------------------------------------------------------------------------------------------------------------
class MajorityTutorEnv(TutorEnv):
    """The tutor task judged by the panel (`--tutor_judge majority`): preference = the panel's vote, reward = the
    judge's Bradley-Terry reward (`BradleyTerryReward`), V* = its best expected value over all teachers. The lessons
    learned stay logged (eval/lessons, a fraction of H - 1 as the default task's reward)."""

    def __init__(self, rules: TutorRules = TutorRules(), **kwargs):
        super().__init__(rules, **kwargs)
        self.judge = MajorityJudge(rules.max_turns)
        self.bradley_terry = BradleyTerryReward(rules)

    def reward(self, convs):
        return self.bradley_terry(convs)

    @functools.cached_property
    def bradley_terry_optimum(self) -> Expectimax:
        """The teacher maximising the Bradley-Terry reward over all teachers (V* and the scripted optimum)."""
        return Expectimax(lambda p, f: self.bradley_terry.of_criteria(f), self.rules)

    def optimal_value(self) -> float:
        return self.bradley_terry_optimum.value

    def dialogue_metrics(self, convs):
        out = super().dialogue_metrics(convs)
        f = np.array([criteria(c, self.max_turns) for c in convs], dtype=float)
        out.update({"eval/lessons": float(f[:, 0].mean() / (self.max_turns - 1)), "eval/asks": float(f[:, 1].mean()),
                    "eval/first_lesson_turn": float(f[:, 2].mean())})
        return out

    def scripted_policies(self):
        def nash(contexts, rng):
            g = solve_game(self.rules)  # about 5 s, then cached
            return play_teachers(self, contexts, g["teachers"], g["weights"], rng)

        def bradley_terry_optimal(contexts, rng):
            return play_teachers(self, contexts, [self.bradley_terry_optimum.policy], [1.0], rng)

        return {**super().scripted_policies(), "nash": nash, "bradley_terry_optimal": bradley_terry_optimal}


def main() -> None:
    env = MajorityTutorEnv()
    rules, game, bt = env.rules, solve_game(env.rules), env.bradley_terry
    names, nash = game["names"], game["nash"]
    print("P(row > column) among the teachers of the double oracle:")
    for n, row in zip(names, game["matrix"]):
        print(f"  {n:24s} " + " ".join(f"{x:.3f}" for x in row))
    print("Nash weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, game["weights"]) if w >= 5e-4) +
          f"; the best response to it wins {0.5 + game['exploitability']:.4f}")
    print(f"Bradley-Terry weights (learned, -asks, -first) {np.round(bt.weights, 4)}, accuracy on the reference's "
          f"untied pairs {bt.accuracy:.4f}")
    bt_best = env.bradley_terry_optimum
    d_bt = outcome_distribution(bt_best.policy, rules)
    ref = outcome_distribution(reference_teacher(rules), rules)
    print(f"its accuracy on the Nash's own pairs {ranking_accuracy(bt.of_criteria, nash, nash):.4f}, on pairs of "
          f"the Nash and its maximiser {ranking_accuracy(bt.of_criteria, nash, d_bt):.4f}")
    print(f"V* of the Bradley-Terry reward {bt_best.value:.4f}; its maximiser against the Nash "
          f"{policy_preference(d_bt, nash):.4f}, the best response to the maximiser wins "
          f"{best_response(d_bt, rules).value:.4f}; the scripted reference against the Nash "
          f"{policy_preference(ref, nash):.4f}")


if __name__ == "__main__":
    main()
