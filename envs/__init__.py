"""envs: the environments the algorithm scripts train in, below the contract they implement (simulator.Environment).

    flags.py           --env and the flags every script shares (EnvArgs); make_env_from_args builds what they name
    loading.py         models by name: the policy (--model_name_or_path), tokenizers, load errors
    tutor_task.py      the embedded task "tutor": rules, exact values (V*), the SFT reference policy mu
                       (python -m envs.tutor_task builds mu and prints its value beside V*)
    gift_task.py       the real-language task "gift" for a real chat model (--env gift): ask, then recommend
    chat_env.py        the papers' chat setting: prompted users (in-process or an endpoint), judges, HF reward model
    chat_datasets.py   the papers' dataset formats (message lists, UltraInteract, HH, Education Dialogue)
    learned_reward.py  the RLHF baseline's Bradley-Terry reward model, learned from preferences (mtpo.py)

Imports run one way: the scripts -> envs -> simulator -> plumbing. Your own task: docs/your_environment.md.
"""
