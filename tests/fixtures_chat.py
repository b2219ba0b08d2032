"""Local stand-ins for what the README's chat commands download: tiny random-init models (a Llama-3-template policy,
a Bradley-Terry reward model, an ArmoRM-style reward model with its own code) and dataset files in the hub datasets'
own formats, with real data's variety (Anthropic HH records of 1-5 turns, some with roles out of order; UltraInteract
trajectories of 1-7 turns; Education Dialogue lessons of 10-15 teacher turns), and an OpenAI-compatible server that
answers as the user simulator, the Education Dialogue student and the judge."""
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from envs import chat_datasets
from envs import tutor_task
from templates import LLAMA3_TEMPLATE

# ---------------------------------------------------------------------------------------------------- datasets
HH_QUESTIONS = [
    "What are some good ways to save money on groceries ?", "How do I get my toddler to sleep through the night ?",
    "Can you help me write a birthday poem for my sister ?", "Why is the sky blue ?",
    "What is the best way to learn a new language as an adult ?", "How can I fix a leaky faucet ?",
    "What should I pack for a week of hiking ?", "Is it safe to eat raw cookie dough ?",
    "How do volcanoes form ?", "What are some fun things to do in Chicago ?",
    "Can you recommend a good science fiction book ?", "How do I make my resume stand out ?",
]
HH_FOLLOW_UPS = [
    "Can you say more about that ?", "What if that does not work ?", "Thanks . Anything else I should know ?",
    "How long does that usually take ?", "Is there a cheaper option ?", "Why does that help ?",
    "Can you give me an example ?", "What would you do in my place ?",
]
HH_ANSWERS = [
    "Sure . Here are a few ideas you could try .", "That depends on a few things , but usually it helps to start small .",
    "Good question . The short answer is that light scatters .", "I would start by making a simple plan .",
    "Many people find it useful to ask an expert first .", "It can take a while , so be patient with yourself .",
]


def hh_transcript(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in turns)


def hh_records(rng: np.random.Generator, n_good: int = 40) -> tuple[list[dict], dict[str, int], int]:
    """Anthropic/hh-rlhf records (chosen/rejected transcripts) of 1-5 Human turns, each opening with its own first
    question; plus records with roles out of order as some real HH transcripts have. Returns (records in file
    order, first question -> number of Human turns, number of malformed records)."""
    records, turns_of = [], {}
    for k in range(n_good):
        n = 1 + k % 5  # 1..5 turns, each length equally often
        first = f"{HH_QUESTIONS[k % len(HH_QUESTIONS)][:-2]} ( case {k} ) ?"  # unique: identifies the record
        qs = [first] + [HH_FOLLOW_UPS[j] for j in rng.choice(len(HH_FOLLOW_UPS), n - 1, replace=False)]
        ans = [HH_ANSWERS[j] for j in rng.integers(0, len(HH_ANSWERS), n)]
        chosen = hh_transcript(list(zip(qs, ans)))
        rejected = hh_transcript(list(zip(qs, ans[:-1] + ["I do not know ."])))
        records.append({"chosen": chosen, "rejected": rejected})
        turns_of[first] = n
    bad = [{"chosen": "\n\nHuman: hi\n\nHuman: are you there ?\n\nAssistant: yes .",  # two Human turns in a row
            "rejected": "\n\nHuman: hi\n\nAssistant: no ."},
           {"chosen": "\n\nAssistant: Hello !\n\nHuman: hi\n\nAssistant: How can I help ?",  # opens with Assistant
            "rejected": "\n\nAssistant: Hello !"},
           {"chosen": "\n\nHuman: Why is the sky blue ?\n\nAssistant: Light scatters .\n\nAssistant: Mostly blue .",
            "rejected": "\n\nHuman: Why is the sky blue ?\n\nAssistant: It is not ."}]  # two Assistant turns
    for j, b in enumerate(bad):
        records.insert(5 + 11 * j, b)
    return records, turns_of, len(bad)


UI_TASKS = ["Solve for x : 3 x + 5 = 20 .", "Write a Python function that returns the sum of a list .",
            "How many primes are there below 30 ?", "Simplify the fraction 42 / 56 .",
            "Write a SQL query that counts the rows of a table named users .", "What is 17 times 23 ?"]
UI_FEEDBACK = ["Your answer is wrong . Check the second step again .",
               "Your answer is wrong . You forgot the edge case of an empty list .",
               "Your answer is wrong . Recount the primes carefully ."]


def ultrainteract_records(n: int = 30) -> tuple[list[dict], int]:
    """openbmb/UltraInteract_pair records: a trajectory of 1-7 user turns (the first instruction, then the
    environment's feedback after each wrong attempt) and the chosen/rejected next replies. Returns (records, number
    with more than 5 user turns, which the papers' filter drops)."""
    out, too_long = [], 0
    for k in range(n):
        n_turns = [1, 2, 3, 1, 4, 2, 5, 1, 3, 6, 2, 7][k % 12]
        traj = [{"from": "user", "value": f"Task {k} : {UI_TASKS[k % len(UI_TASKS)]}"}]
        for t in range(n_turns - 1):
            traj += [{"from": "assistant", "value": f"Step 1 : attempt {t} . The answer is {t + 3} ."},
                     {"from": "user", "value": UI_FEEDBACK[(k + t) % len(UI_FEEDBACK)]}]
        out.append({"id": f"ui{k}", "task": "Math_CoT", "dataset": "gsm8k", "trajectory": traj,
                    "chosen": "Step 1 : read the task again . The answer is 5 .",
                    "rejected": "Step 1 : guess . The answer is 4 ."})
        too_long += n_turns > 5
    return out, too_long


TOPICS = ["Photosynthesis", "The Roman Empire", "Fractions", "Volcanoes", "The Water Cycle", "Magnetism",
          "Shakespeare", "World War I"]
PREFERENCES = ["hands-on activities/real-world applications", "story telling/narratives",
               "visual aids/diagrams", "interactive discussions/debates"]


def education_lessons(rng: np.random.Generator, n: int = 8) -> list[dict]:
    """Education Dialogue's JSON list: background_info (topic, hidden student and teacher preferences and
    reactions) and a lesson of 10-15 Teacher turns, each followed by the Student."""
    out = []
    for k in range(n):
        topic = TOPICS[k % len(TOPICS)]
        conv = []
        for t in range(int(rng.integers(10, 16))):
            conv.append({"role": "Teacher", "text": f"Part {t + 1} of our lesson on {topic} : let me explain ."})
            conv.append({"role": "Student", "text": ["Okay .", "Can we try an example ?", "I am not sure I follow .",
                                                     "That is interesting !"][(k + t) % 4]})
        out.append({"background_info": {"topic": topic, "student_prefrences": PREFERENCES[k % 4],
                                        "teacher_prefrences": PREFERENCES[(k + 1) % 4],
                                        "student_reactions": "and gets frustrated and disengaged otherwise",
                                        "teacher_reactions": "but might adapt to the student"},
                    "conversation": conv})
    return out


def write_datasets(path: Path, seed: int = 0) -> dict:
    """hh.jsonl, ultrainteract.jsonl and conversations_train1.json under path; what a test checks about them."""
    rng = np.random.default_rng(seed)
    hh, hh_turns, hh_bad = hh_records(rng)
    (path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    ui, ui_too_long = ultrainteract_records()
    (path / "ultrainteract.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ui))
    (path / "conversations_train1.json").write_text(json.dumps(education_lessons(rng), indent=1))
    return dict(hh_turns=hh_turns, hh_malformed=hh_bad, ui_too_long=ui_too_long)


# ------------------------------------------------------------------------------------------------------ models
def fixture_words() -> list[str]:
    texts = (HH_QUESTIONS + HH_FOLLOW_UPS + HH_ANSWERS + UI_TASKS + UI_FEEDBACK + TOPICS + PREFERENCES +
             [chat_datasets.EDUCATION_SYSTEM, chat_datasets.EDUCATION_OPENING, "Step 1 : attempt the answer is read task again guess ."
              "Part of our lesson on let me explain Okay Can we try an example I am not sure follow That interesting !"
              " case ( ) Human Assistant Task do know"])
    base = tutor_task.build_tutor_tokenizer()
    words = {w for t in texts for w in t.split()} | {w for w in base.get_vocab() if not w.startswith("<")}
    return sorted(words | {"user", "assistant", "system"} | {str(i) for i in range(100)})


def llama3_chat_tokenizer():
    """A word-level tokenizer over the fixtures' words with Llama-3's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *specials, *fixture_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<|begin_of_text|>", additional_special_tokens=specials,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


ARMO_CODE = '''"""An ArmoRM-style reward model: its own code (trust_remote_code) and an output whose preference score is .score
(ArmoRM: 19 objective rewards mixed by a gating network; here their mean)."""
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import LlamaForSequenceClassification
from transformers.utils import ModelOutput


@dataclass
class ArmoStandInOutput(ModelOutput):
    rewards: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None


class ArmoStandIn(LlamaForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        rewards = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return ArmoStandInOutput(rewards=rewards, score=rewards.mean(-1))
'''


def write_models(path: Path) -> dict[str, Path]:
    """policy/ (a 6-layer Llama, so --train_top_layers 4 leaves layers frozen), rm/ (a Bradley-Terry
    sequence-classifier, num_labels=1) and armo_rm/ (19 rewards, its own code, .score); Llama-3 template, padding
    id in each config."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = llama3_chat_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))
    torch.manual_seed(0)
    out = {name: path / name for name in ("policy", "rm", "armo_rm")}
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=6, **common)).save_pretrained(out["policy"])
    LlamaForSequenceClassification(LlamaConfig(num_hidden_layers=1, num_labels=1, **common)).save_pretrained(out["rm"])
    LlamaForSequenceClassification(LlamaConfig(num_hidden_layers=1, num_labels=19, **common)).save_pretrained(
        out["armo_rm"])
    config = json.loads((out["armo_rm"] / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_armo_standin.ArmoStandIn"}
    (out["armo_rm"] / "config.json").write_text(json.dumps(config, indent=1))
    (out["armo_rm"] / "modeling_armo_standin.py").write_text(ARMO_CODE)
    for p in out.values():
        tok.save_pretrained(p)
    return out


# ------------------------------------------------------------------------------------------------------ server
def dialogue_between(prompt: str, start: str, end: str) -> str:
    m = re.search(re.escape(start) + r"(.*?)" + re.escape(end), prompt, flags=re.S)
    return m.group(1) if m else ""


class StandInHandler(BaseHTTPRequestHandler):
    """/v1/chat/completions as a vLLM server of `served` models answers: the judge (a prompt asking for
    'Preferred:') prefers the longer dialogue, so its verdict does not depend on the A/B order; the Education
    Dialogue student replies on a 'Student:' line; the user simulator on a 'Question:' line."""
    served: set = set()
    counts: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model, prompt = body["model"], body["messages"][-1]["content"]
        if not self.path.endswith("/chat/completions") or model not in self.served:
            return self.reply(404, json.dumps({"error": f"model {model} not found (serving {sorted(self.served)})"}))
        if "Preferred:" in prompt:
            kind = "judge"
            a = dialogue_between(prompt, "Dialogue A:", "Dialogue B:")
            b = dialogue_between(prompt, "Dialogue B:", "\n\nInstructions:") or \
                dialogue_between(prompt, "Dialogue B:", "\n\nA good lesson")
            text = f"Comparison: one is longer.\nPreferred: {'A' if len(a) >= len(b) else 'B'}"
        elif "Student: <" in prompt:
            kind = "student"
            text = "Justification: I like examples.\nStudent: Can we try an example ?"
        else:
            kind = "user"
            text = "Justification: I want to know more.\nQuestion: Can you give me an example ?"
        with self.lock:
            StandInHandler.counts[kind] += 1
        self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}))

    def reply(self, code: int, data: str):
        raw = data.encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except BrokenPipeError:
            pass


def start_server(served: set):
    """(server, base url): the stand-in for `vllm serve MODEL ... --port P`, on a free local port."""
    StandInHandler.served = set(served)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), StandInHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
