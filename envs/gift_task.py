"""envs/gift_task.py: the real-language task "gift", a shop assistant who should ask before suggesting.

A customer is buying a present (a mug, a scarf, ...) for someone (a sister, a dad, ...) and asks which colour to
pick. The recipient's favourite colour is the customer's hidden state: the assistant can only learn it by asking.
Each assistant turn that names colours gets the customer's reaction, decided by code: "I love it, thank you!" when
it names the favourite colour and no other, "Hmm, that is not her favourite colour." when it names others. A turn
that names no colour gets an answer from the user model: a chat model prompted with the hidden colour (roles
swapped: it sees the assistant's turns as its user's), or, with `--user_model scripted`, a rule (a question about
colour is answered with the colour). The reward r(s_{H+1}) is 1 when the customer was delighted by some turn (found
a present they love), else 0: deterministic given the text, so it can be checked by hand.

Asking pays: with two or more turns, an assistant that asks in turn 1 and names the answer in turn 2 always wins
against the scripted user (V* = 1), while one that never asks guesses: 1/6 for the first guess, 1/5 for a second
that avoids the first, 1/3 over two turns. It is the tutor task's lesson in English, for a real pretrained chat
model: docs/gift_task.md has the measured base rates, REFUEL's curves over seeds, the time an iteration takes on a
CPU and conversations before and after training.

    python refuel.py --env gift --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --max_turns 2 \
        --max_new_tokens 32 --temperature 0.7 --bf16 True --lr 2e-5
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

import simulator as sim

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
GIFTS = ("mug", "scarf", "notebook", "umbrella", "backpack", "lamp", "jumper", "water bottle")
RECIPIENTS = (("sister", "her"), ("brother", "his"), ("mum", "her"), ("dad", "his"), ("friend Anna", "her"),
              ("friend Tom", "his"), ("grandmother", "her"), ("son", "his"), ("daughter", "her"), ("uncle", "his"))
OPENINGS = ("I'm buying a {gift} for my {who}'s birthday. Which colour should I pick?",
            "I want to get my {who} a {gift} as a present. What colour would be best?",
            "Can you help me choose a {gift} for my {who}? I'm not sure which colour to get.")
SYSTEM = ("You are a helpful gift shop assistant. Find out what the customer's recipient likes, then recommend one "
          "colour. Reply in one or two short sentences.")
USER_SYSTEM = ("You are a customer in a gift shop, buying a {gift} for your {who}. {Their} favourite colour is "
               "{colour}. Answer the shop assistant in one short sentence.")
GREETING = "Hello! How can I help you today?"  # the shop assistant's first words, as the user model sees them
DELIGHTED = "I love it, thank you!"
WRONG = "Hmm, that is not {their} favourite colour."
SCRIPTED_ANSWER, SCRIPTED_NUDGE = "{Their} favourite colour is {colour}.", "Could you suggest a colour?"


def colours_named(text: str) -> set:
    """The task's colours a text names, as whole words."""
    return {c for c in COLOURS if re.search(rf"\b{c}\b", text.lower())}


def asks_about_colour(text: str) -> bool:
    """A question that mentions colour: what the scripted user answers, and what eval/asked_rate counts."""
    return "?" in text and re.search(r"colou?r", text.lower()) is not None


class GiftEnv(sim.Environment):
    """The gift task; `user` is an LM user (`LMUser`) or None for the scripted user."""
    name = "gift"
    scores_final_user_reply = True  # the reward reads the customer's reactions, the last turn's too

    def __init__(self, user: Optional["LMUser"] = None, max_turns: int = 2):
        self.user, self.max_turns = user, max_turns

    def contexts(self, n, split, rng):
        # train and eval draw from the same customers: the held-out set is new draws, not new kinds of customer
        out = []
        for i in range(n):
            gift, (who, their), colour = (GIFTS[rng.integers(len(GIFTS))], RECIPIENTS[rng.integers(len(RECIPIENTS))],
                                          COLOURS[rng.integers(len(COLOURS))])
            opening = OPENINGS[rng.integers(len(OPENINGS))].format(gift=gift, who=who)
            state = {"gift": gift, "who": who, "their": their, "Their": their.capitalize(), "colour": colour}
            out.append(sim.Context(i, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}],
                                   state))
        return out

    def user_turn(self, convs, users, rng):
        replies: list = [None] * len(convs)
        free = []  # turns that name no colour: the user model answers them
        for i, (conv, u) in enumerate(zip(convs, users)):
            named = colours_named(conv[-1]["content"])
            if named == {u["colour"]}:
                replies[i] = DELIGHTED
            elif named:
                replies[i] = WRONG.format(**u)
            elif self.user is None:
                replies[i] = (SCRIPTED_ANSWER if asks_about_colour(conv[-1]["content"]) else SCRIPTED_NUDGE).format(**u)
            else:
                free.append(i)
        if free:
            for i, reply in zip(free, self.user([convs[i] for i in free], [users[i] for i in free])):
                replies[i] = reply
        return replies

    def reward(self, convs):
        return torch.tensor([float(any(m["role"] == "user" and m["content"] == DELIGHTED for m in c)) for c in convs])

    def optimal_value(self):
        if self.user is not None:
            return None  # an LM user may not answer: V* is not known exactly
        return 1.0 if self.max_turns >= 2 else 1 / len(COLOURS)  # ask, then name it; one turn: one guess

    def dialogue_metrics(self, convs):
        said = [[m["content"] for m in c if m["role"] == "assistant"] for c in convs]
        n = max(len(convs), 1)
        return {"eval/asked_rate": sum(any(asks_about_colour(t) for t in turns) for turns in said) / n,
                "eval/first_turn_guess_rate": sum(bool(turns and colours_named(turns[0])) for turns in said) / n}

    @classmethod
    def from_flags(cls, args, max_turns, tokenizer=None, device="cpu", dtype=torch.float32, **extra):
        """--user_model: the model that plays the customer (default: the policy's starting checkpoint, a frozen
        copy; 'scripted': the rule user, for which V* is known)."""
        ignored = [f"--{k}" for k in ("prompts_path", "user_api_base", "user_prompt_path", "reward_model")
                   if getattr(args, k, None) is not None] + [f"--{k}" for k, v in extra.items() if v is not None]
        if ignored:
            raise ValueError(f"--env gift has its own prompts, reward and in-process user: {', '.join(ignored)} "
                             f"would be ignored")
        # the policy's starting checkpoint (evaluate.py: its reference policy)
        name = args.user_model or getattr(args, "model_name_or_path", None) or getattr(args, "reference", None)
        if name in (None, "tutor"):
            raise ValueError("--env gift is played by a chat model: give --model_name_or_path (or --user_model "
                             "scripted, or --user_model NAME for the customer)")
        if name == "scripted":
            return cls(None, max_turns)
        from envs.loading import load_policy, load_tokenizer

        model = load_policy(name, dtype)[0].to(device).eval().requires_grad_(False)
        return cls(LMUser(model, load_tokenizer(name)), max_turns)


class LMUser:
    """A chat model playing the customer: it reads the conversation with the roles swapped (the assistant's turns as
    its user's, after a greeting, so the rows start with a user turn as every template wants) under a system prompt
    that names the hidden colour, and its next turn is the customer's reply. Greedy: the same conversation always
    gets the same answer, so the reward is a function of the assistant's text. SmolLM2-135M-Instruct in this role
    names the colour to most questions about colour and to few other turns (docs/gift_task.md)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 32, max_batch_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.max_batch_size = max_new_tokens, max_batch_size

    def prompt_rows(self, convs: Sequence[sim.Conversation], users: Sequence[dict]) -> list:
        """What the user model reads: the hidden colour's system prompt, the greeting, then the dialogue swapped."""
        swap = {"user": "assistant", "assistant": "user"}
        return [[{"role": "system", "content": USER_SYSTEM.format(**u)}, {"role": "user", "content": GREETING}]
                + [{"role": swap[m["role"]], "content": m["content"]} for m in c if m["role"] != "system"]
                for c, u in zip(convs, users)]

    def __call__(self, convs: Sequence[sim.Conversation], users: Sequence[dict]) -> list:
        out = sim.sample_turns(self.model, self.tokenizer, self.prompt_rows(convs, users), self.max_new_tokens,
                               temperature=0, max_batch_size=self.max_batch_size)
        return [t.strip() or "Sorry?" for t in out.texts]
