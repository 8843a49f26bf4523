"""A listwise judge: a local causal LM that ranks a group's G completions in one prompt.

RULER-style (OpenPipe's ART: one judge call sees every candidate of a group and ranks them
relative to each other): comparing candidates side by side needs no absolute scale, which is
what GRPO's group-relative advantages use anyway. The judge is any `from_pretrained` directory;
its prompt is `template` with `{prompt}` (the task), `{candidates}` (one "[i] completion" line
per candidate, numbered from 1) and `{n}` (G) filled in; it answers greedily, and its first line
is read as a ranking, best first: "2 > 1 = 3" (">" better, "=" tied; brackets allowed). Each
candidate must appear exactly once.

A group reward (grpo.rewards.groups): the ranking becomes scores in [0, 1]. An answer that cannot
be read as a ranking gives the whole group None (the judge does not apply: counted 0 in the sum,
so with no other reward the group's advantages are 0); the share of such groups is logged as
`reward/judge_unparsed_frac`, and every judge answer goes to the samples as `judge_output`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from grpo.algorithm import tiers_to_scores
from grpo.data import content_of, is_messages
from grpo.errors import RewardError

from .groups import GroupReward

DEFAULT_TEMPLATE = (
    "Rank the {n} candidate answers to the task below from best to worst.\n"
    "Task: {prompt}\n"
    "{candidates}\n"
    "Answer with the candidate numbers, best first, separated by \">\" (\"=\" for a tie), e.g. \"2 > 1 = 3\".\n"
    "Ranking: ")
_TOKEN = re.compile(r"\[?\s*(\d+)\s*\]?|([>=])|(\S)")


def parse_judge_ranking(text: str, n: int) -> list[list[int]] | None:
    """The ranking in a judge's answer, as tie groups of 0-based indices best first, or None.

    Reads the first non-empty line: numbers 1..n separated by ">" (better) or "=" (tied), each
    number once; brackets around a number and spaces are allowed, anything else is not."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    tiers, expect_number = [[]], True
    for m in _TOKEN.finditer(line.rstrip(".")):
        number, separator, other = m.groups()
        if other is not None or (number is not None) != expect_number:
            return None
        if number is not None:
            tiers[-1].append(int(number) - 1)
        elif separator == ">":
            tiers.append([])
        expect_number = not expect_number
    flat = [i for t in tiers for i in t]
    if expect_number or sorted(flat) != list(range(n)):
        return None
    return tiers


def template_text(template: str) -> str:
    """A template given inline, or the path of a file holding it ("" : DEFAULT_TEMPLATE)."""
    if not template:
        return DEFAULT_TEMPLATE
    if "{" not in template and Path(template).is_file():
        return Path(template).read_text()
    return template


def check_template(template: str, where: str) -> str:
    text = template_text(template)
    try:
        text.format(prompt="", candidates="", n=0)
    except (KeyError, IndexError, ValueError) as e:
        raise RewardError(f"{where}: the judge template can only use {{prompt}}, {{candidates}} and {{n}} "
                          f"(double other braces): {type(e).__name__}: {e}") from None
    if "{candidates}" not in text:
        raise RewardError(f"{where}: the judge template must contain {{candidates}}")
    return text


def _task_text(prompt) -> str:
    """The task as text: a string, or the last message's content of a conversation."""
    return str(prompt[-1]["content"]) if is_messages(prompt) and prompt else str(prompt)


class ListwiseJudge(GroupReward):
    """The judge as a group reward: every group's judge prompt generated in one batch."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, *, template: str = "",
                 max_new_tokens: int = 32, max_length: int = 1024, batch_size: int = 64):
        from grpo.engine.models import load_causal_lm, load_tokenizer

        self.template = check_template(template, f"judge {path!r}")
        try:
            self.tokenizer = load_tokenizer(path)
            self.model = load_causal_lm(path, device, dtype, trainable=False)
        except (OSError, ValueError) as e:
            raise RewardError(f"judge {path!r}: cannot load it: {e}") from None
        self.device, self.max_new_tokens = device, max_new_tokens
        self.max_length, self.batch_size = max_length, batch_size
        super().__init__(self.rank)
        self.__name__ = "judge_" + (Path(path).name or path)

    def rank(self, prompt, completions, **_):  # one group alone (the batched path is __call__)
        return self.judge([prompt], [list(completions)])[0][0]

    def judge_prompt(self, prompt, completions: list) -> str:
        candidates = "\n".join(f"[{i + 1}] {content_of(c).strip()}" for i, c in enumerate(completions))
        return self.template.format(prompt=_task_text(prompt), candidates=candidates, n=len(completions))

    @torch.no_grad()
    def answers(self, texts: list[str]) -> list[str]:
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_length:] for t in chunk]
            width = max(len(x) for x in ids)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
            generated = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                            max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                            eos_token_id=self.tokenizer.eos_token_id)
            out += self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        return out

    def judge(self, prompts: list, groups: list[list]) -> tuple[list, list[str]]:
        """(each group's ranking or None, each group's raw answer)."""
        answers = self.answers([self.judge_prompt(p, g) for p, g in zip(prompts, groups)])
        return [parse_judge_ranking(a, len(g)) for a, g in zip(answers, groups)], answers

    def __call__(self, prompts, completions, group_size: int | None = None, log_metric=None, log_extra=None,
                 **_) -> list:
        G = group_size or len(completions)
        starts = range(0, len(completions), G)
        rankings, answers = self.judge([prompts[s] for s in starts], [list(completions[s:s + G]) for s in starts])
        if log_metric is not None:
            log_metric("judge_unparsed_frac",  # logged as reward/judge_unparsed_frac
                        sum(r is None for r in rankings) / max(1, len(rankings)))
        if log_extra is not None:
            log_extra("judge_output", [a for a in answers for _ in range(G)])
        return [v for r in rankings for v in ([None] * G if r is None else tiers_to_scores(r, G))]
