"""The two reward functions of the migration example, written for TRL's GRPOTrainer and used
unchanged by grpo (YAML: `rewards.py:correct`; Python: the functions themselves)."""


def correct(completions, answer, **kwargs):
    """1.0 when the completion is exactly the row's answer (a dataset column, passed by name)."""
    return [1.0 if completion.strip() == str(a) else 0.0 for completion, a in zip(completions, answer)]


def brevity(completion_ids, **kwargs):
    """A small penalty per generated token (TRL passes the token ids as `completion_ids`)."""
    return [-0.1 * len(ids) for ids in completion_ids]
