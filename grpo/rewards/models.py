"""Reward models: what turns (prompt, completion) text into a scalar score, in three kinds.

- `score_head`: a one-label sequence classifier (`AutoModelForSequenceClassification`, for a
  Llama backbone LlamaForSequenceClassification: the transformer plus a linear `score` head read
  at the last real token), as InstructGPT's reward model (Ouyang et al. 2022).
- `likelihood`: a generative verifier, the completion's log-likelihood under a causal LM,
  r = mean_t log p(y_t | x, y_<t) (or the sum), trained with the Bradley-Terry loss on these
  scores plus an optional NLL term on the chosen completion, so the model that scores is also a
  model of right answers (Generative Verifiers, Zhang et al. 2024, arXiv:2408.15240, which train
  verification as next-token prediction alongside the solutions' NLL).
- `dpo`: DPO's implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023,
  arXiv:2305.18290, eq. 5), pi trained with the DPO loss (Bradley-Terry on these rewards) from
  pi_ref = the backbone, which is kept frozen in `reference/` inside the directory.

Every kind is saved as a directory that plain transformers loads (a sequence classifier, or a
causal LM) with `reward_model.json` recording its kind and settings, so `rewards: [{model: DIR}]`
reads the kind from the directory instead of guessing it. A directory without that file that holds
a sequence classifier is a `score_head` (as saved before kinds existed).

Each reads exactly the text the policy saw: the formatted prompt, then the completion (whitespace
at its ends stripped, as the verifiers and the preference pairs strip it: "70 " and "70" are
one answer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from grpo.config.train import RewardSpec
from grpo.engine.logprobs import completion_logprobs
from grpo.errors import RewardError

KIND_FILE = "reward_model.json"
KINDS = ("score_head", "likelihood", "dpo")
REFERENCE_DIR = "reference"


class RunningMoments:
    """Running mean and variance (Chan et al. parallel update), for normalising reward-model scores."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        n = xs.numel()
        if n == 0:
            return
        mean, var = xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += var * n + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.m2 = s["count"], s["mean"], s["m2"]


# The reward model must score exactly the text the policy produced it from: the prompt formatted as
# the policy saw it (chat template included) followed by the completion. Training
# (grpo.supervised.reward_model) and scoring (RewardModelScorer) both go through these functions.

def completion_text(completion) -> str:
    """A completion as plain text: a string, or the content of a list of (assistant) chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"]) for m in completion)
    raise TypeError(f"a completion must be text or a list of chat messages, got {type(completion).__name__}")


def reward_model_text(formatted_prompt: str, completion) -> str:
    """What a reward model reads: the policy's formatted prompt, then the completion, no separator."""
    return formatted_prompt + completion_text(completion).strip()


def encode_for_scoring(tokenizer, texts: list[str], max_length: int, device=None):
    """Right-padded ids and mask. A long text loses its *start*: the completion at the end is what
    is being judged, and the score is read at the last real token."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] or [tokenizer.pad_token_id]
           for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return input_ids.to(device), mask.to(device)


def encode_completions(tokenizer, prompts: list[str], completions: list, max_length: int, device=None):
    """(prompt ids, prompt mask) left-padded and (completion ids + EOS, mask) right-padded, for the
    likelihood kinds; a pair longer than max_length loses the start of its prompt."""
    eos = tokenizer.eos_token_id
    rows = []
    for p, c in zip(prompts, completions):
        tokens = tokenizer(completion_text(c).strip(), add_special_tokens=False)["input_ids"]
        completion = tokens[: max_length - 1] + [eos]
        room = max_length - len(completion)
        prompt = tokenizer(p, add_special_tokens=False)["input_ids"][-room:] if room > 0 else []
        rows.append((prompt, completion))
    width_p = max(1, max(len(p) for p, _ in rows))
    width_c = max(len(c) for _, c in rows)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.full((len(rows), width_p), pad, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(rows), width_c), pad, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i, (p, c) in enumerate(rows):
        if p:
            prompt_ids[i, width_p - len(p):] = torch.tensor(p)
            prompt_mask[i, width_p - len(p):] = 1
        else:  # an empty prompt: one padding column it can attend to, so the first token has context
            prompt_mask[i, -1] = 1
        completion_ids[i, :len(c)] = torch.tensor(c)
        completion_mask[i, :len(c)] = 1
    return [t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)]


def prepare_for_scoring(model, tokenizer) -> None:
    """Give the tokenizer a pad token and tell the model which id it is.

    A causal LM's sequence-classification head (e.g. LlamaForSequenceClassification) reads the
    score at the rightmost token that is not `config.pad_token_id`; without one it cannot batch.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None or model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(model, "score", None)  # the one-label head of *ForSequenceClassification
    if isinstance(head, torch.nn.Linear):
        # The score in float32, whatever the backbone computes in (bf16 weights, or autocast while
        # training): a bf16 score keeps ~3 significant digits, enough to tie completions of one
        # group that the model does rank apart (zero advantage for both) and preference pairs.
        head.float()
        linear = head.forward

        def float32_score(hidden: torch.Tensor) -> torch.Tensor:
            with torch.autocast(hidden.device.type, enabled=False):
                return linear(hidden.float())
        head.forward = float32_score


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence [B]: the one-label head at the last real token (fp32)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


# ----------------------------------------------------------------------------------------------
# The three kinds. Each: `scores(prompts, completions)` [B] float32 (differentiable under grad),
# `model` (what is trained), `save(directory)`.

class ScoreHead:
    kind = "score_head"

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        prepare_for_scoring(model, tokenizer)

    def settings(self) -> dict:
        return {}

    def scores(self, prompts: list[str], completions: list) -> torch.Tensor:
        device = next(self.model.parameters()).device
        texts = [reward_model_text(p, c) for p, c in zip(prompts, completions)]
        return sequence_scores(self.model, *encode_for_scoring(self.tokenizer, texts, self.max_length, device))

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        write_kind(directory, self.kind, self.settings())


class Likelihood:
    kind = "likelihood"
    REDUCTIONS = ("mean", "sum")

    def __init__(self, model, tokenizer, max_length: int, reduction: str = "mean"):
        if reduction not in self.REDUCTIONS:
            raise RewardError(f"score_reduction must be one of {self.REDUCTIONS}, got {reduction!r}")
        self.model, self.tokenizer, self.max_length, self.reduction = model, tokenizer, max_length, reduction

    def settings(self) -> dict:
        return {"score_reduction": self.reduction}

    def token_logprobs(self, model, prompts: list[str], completions: list) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        p, pm, c, cm = encode_completions(self.tokenizer, prompts, completions, self.max_length, device)
        # The model's own forward (engine="plain"): a reward model's rows are not GRPO groups.
        lp, _ = completion_logprobs(model, p, pm, c, cm, engine="plain")
        return lp, cm.float()

    def scores(self, prompts: list[str], completions: list) -> torch.Tensor:
        lp, mask = self.token_logprobs(self.model, prompts, completions)
        total = (lp * mask).sum(-1)
        return total if self.reduction == "sum" else total / mask.sum(-1)

    def nll(self, prompts: list[str], completions: list) -> torch.Tensor:
        """Mean per-token negative log-likelihood of the completions (the NLL term)."""
        lp, mask = self.token_logprobs(self.model, prompts, completions)
        return -(lp * mask).sum() / mask.sum()

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        write_kind(directory, self.kind, self.settings())


class DPOImplicit(Likelihood):
    kind = "dpo"

    def __init__(self, model, reference, tokenizer, max_length: int, beta: float):
        super().__init__(model, tokenizer, max_length, "sum")
        self.reference, self.beta = reference, beta

    def settings(self) -> dict:
        return {"beta": self.beta, "reference": REFERENCE_DIR}

    def scores(self, prompts: list[str], completions: list) -> torch.Tensor:
        lp, mask = self.token_logprobs(self.model, prompts, completions)
        with torch.no_grad():
            ref, _ = self.token_logprobs(self.reference, prompts, completions)
        return self.beta * ((lp - ref) * mask).sum(-1)

    def save(self, directory: Path) -> None:
        super().save(directory)
        self.reference.save_pretrained(directory / REFERENCE_DIR, safe_serialization=True)


def write_kind(directory: Path, kind: str, settings: dict) -> None:
    (Path(directory) / KIND_FILE).write_text(json.dumps({"kind": kind, **settings}, indent=2))


def read_kind(path: str) -> dict:
    """The kind a reward-model directory records; a sequence classifier without the file is a
    score_head; a causal LM without it is refused (its scores would come from nothing trained)."""
    directory = Path(path)
    if (directory / KIND_FILE).is_file():
        info = json.loads((directory / KIND_FILE).read_text())
        if info.get("kind") not in KINDS:
            raise RewardError(f"reward model {path!r}: {KIND_FILE} names kind {info.get('kind')!r}, not one of {KINDS}")
        return info
    config = directory / "config.json"
    if not config.is_file():
        return {"kind": "score_head"}  # a hub id: let from_pretrained decide
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        architectures = []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return {"kind": "score_head"}
    raise RewardError(f"reward model {path!r}: this directory holds a causal LM, not a reward model "
                      f"(no {KIND_FILE}, and config.json lists no *ForSequenceClassification architecture); "
                      f"train one from it with `grpo reward-model train`")


def _quietly(load):
    """From a causal LM, transformers reports the unused lm_head and the new `score` head at
    length; both are expected when a fresh head is made, so keep the console to our messages."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    except (OSError, ValueError) as e:
        raise RewardError(f"reward model: cannot load it: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_reward_model(path: str, device: torch.device, dtype: torch.dtype, tokenizer, *,
                      max_length: int = RewardSpec.max_length,
                      fresh: str | None = None, settings: dict | None = None):
    """A reward model of its kind on `device`.

    `fresh`: `path` is a backbone (a causal LM) from which a new reward model of that kind is made
    to be trained (a fresh score head; the backbone itself; the backbone plus a frozen copy as
    the DPO reference), with `settings` (score_reduction, beta). Otherwise `path` is a saved
    reward model and its kind and settings are read from it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    info = {"kind": fresh, **(settings or {})} if fresh else read_kind(path)
    kind = info["kind"]
    if kind == "score_head":
        model = _quietly(lambda: AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, **({"num_labels": 1} if fresh else {})))
        if model.config.num_labels != 1:
            raise RewardError(f"reward model {path!r}: expected one label (a scalar score), "
                              f"found num_labels={model.config.num_labels}")
        return ScoreHead(model.to(device), tokenizer, max_length)
    model = _quietly(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False))
    model = model.to(device)
    if kind == "likelihood":
        return Likelihood(model, tokenizer, max_length, info.get("score_reduction", "mean"))
    reference_path = path if fresh else str(Path(path) / info.get("reference", REFERENCE_DIR))
    reference = _quietly(lambda: AutoModelForCausalLM.from_pretrained(reference_path, dtype=dtype,
                                                                       trust_remote_code=False)).to(device).eval()
    reference.requires_grad_(False)
    return DPOImplicit(model, reference, tokenizer, max_length, float(info.get("beta", 0.1)))


@torch.no_grad()
def score_batches(rm, prompts: list[str], completions: list, batch_size: int) -> torch.Tensor:
    """Scores [N] on the CPU, in batches, in the model's own dtype wherever called from."""
    out = []
    device = next(rm.model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        with torch.autocast(device.type, enabled=False):
            out.append(rm.scores(prompts[i:i + batch_size], completions[i:i + batch_size]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class RewardModelScorer:
    """A reward model as a reward function: scores (prompt, completion) text under no_grad.

    The reward model sees the same text the policy saw (the formatted prompt followed by the
    completion, see `reward_model_text`). With `normalize`, scores are standardised with running
    moments over all scores seen so far, so a reward model's arbitrary scale does not dominate a
    weighted sum of rewards; the moments are part of a checkpoint (`state_dict`). `clip` bounds
    the (normalised) score to [-clip, clip] (0: no bound), a guard against a policy that finds
    scores far outside what the reward model was trained on.
    """

    reads_model_text = True  # scored on the formatted prompt text, not TRL's reward-function arguments

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, *,
                 batch_size: int = RewardSpec.batch_size, normalize: bool = RewardSpec.normalize,
                 max_length: int = RewardSpec.max_length, clip: float = RewardSpec.clip):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward model {path!r}: cannot load its tokenizer: {e}") from None
        self.rm = load_reward_model(path, device, dtype, self.tokenizer, max_length=max_length)
        self.rm.model.eval()
        self.path, self.device, self.batch_size, self.clip = path, device, batch_size, clip
        self.moments = RunningMoments() if normalize else None
        self.learning = True  # whether scores update the moments (not during held-out evaluation)
        self.__name__ = Path(path).name or path

    @property
    def model(self):
        return self.rm.model

    def raw_scores(self, prompts: list[str], completions: list) -> torch.Tensor:
        return score_batches(self.rm, prompts, completions, self.batch_size)

    def __call__(self, prompts, completions, **_) -> list[float]:
        # `prompts` are already formatted (the rollout and evaluation pass the policy's text).
        scores = self.raw_scores(list(prompts), list(completions))
        if self.moments is not None:
            if self.learning:
                self.moments.update(scores)
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-8)
        if self.clip:
            scores = scores.clamp(-self.clip, self.clip)
        return scores.tolist()

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict() if self.moments else None}

    def load_state_dict(self, state: dict) -> None:
        if self.moments is not None and state.get("moments"):
            self.moments.load_state_dict(state["moments"])


class EnsembleScorer:
    """Several reward models as one reward (Coste et al. 2023, arXiv:2310.02743): the mean of their
    scores, or their minimum (worst-case optimisation: a completion scores well only when every
    member agrees, so a policy cannot exploit one member's error)."""

    REDUCTIONS = ("mean", "min")
    reads_model_text = True

    def __init__(self, members: list[RewardModelScorer], reduction: str):
        if reduction not in self.REDUCTIONS:
            raise RewardError(f"ensemble must be one of {self.REDUCTIONS}, got {reduction!r}")
        self.members, self.reduction = members, reduction
        self.__name__ = "ensemble_" + "_".join(m.__name__ for m in members)

    def __call__(self, prompts, completions, **_) -> list[float]:
        scores = torch.tensor([m(prompts, completions) for m in self.members])  # [M, N]
        return (scores.mean(0) if self.reduction == "mean" else scores.min(0).values).tolist()

    def state_dict(self) -> dict:
        return {"members": [m.state_dict() for m in self.members]}

    @property
    def learning(self) -> bool:
        return all(m.learning for m in self.members)

    @learning.setter
    def learning(self, value: bool) -> None:
        for m in self.members:
            m.learning = value

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self.members, state.get("members", [])):
            m.load_state_dict(s)
