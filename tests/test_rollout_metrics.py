"""What a rollout says about itself, and where its completions end.

- `zero_variance_frac` counts the groups the reward functions cannot rank: ties of the rewards
  before `reward_kl_coef` shifts them by each completion's KL (which unties almost every group);
- the text rewards and evaluation read ends at whichever stop id ended the completion (the
  tokenizer's EOS or any EOS of the model's generation config), as generation's masks do.
"""

from __future__ import annotations

import copy

import pytest
import test_groups_that_teach as shared
import torch

from grpo import algorithm
from grpo.engine.backend import LocalBackend, SamplingParams
from grpo.rewards import Reward
from grpo.train.evaluate import evaluate
from grpo.train.rollout import Rollout, collect_rollout
from grpo.train.update import rollout_metrics

pytestmark = pytest.mark.usefixtures("one_thread_module")


# The same small run and module-scoped policy and tokenizer as the groups-that-teach tests.
policy, tokenizer = shared.policy, shared.tokenizer


def config(tiny_model_dir, addition_files, **kw):
    return shared.config(tiny_model_dir, addition_files, **{"prompts_per_step": 2, **kw})


def rows(n):
    return [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]


def test_zero_variance_frac_counts_ties_before_the_kl_shift_on_a_hand_made_rollout(tiny_model_dir, addition_files):
    P, G = 3, 4
    N = P * G
    before = torch.tensor([1.0] * G + [0.0] * G + [0.5] * G)  # every group ties on the reward
    kl = torch.linspace(0.0, 1.0, N)                            # and the KL differs in every row
    shifted = before - 0.1 * kl
    rollout = Rollout(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1),
                      completion_ids=torch.zeros(N, 2, dtype=torch.long), completion_mask=torch.ones(N, 2),
                      truncated=torch.zeros(N, dtype=torch.bool), lengths=torch.full((N,), 2),
                      rewards=shifted, advantages=torch.zeros(N), rewards_per_function={"exact_answer": before},
                      rewards_before_kl=before)
    cfg = config(tiny_model_dir, addition_files, group_size=G, prompts_per_step=P, reward_kl_coef=0.1)
    assert not algorithm.zero_variance_groups(shifted, G).any()  # what the metric used to count
    assert rollout_metrics(rollout, cfg, None)["zero_variance_frac"] == 1.0
    # A rollout built without the pre-shift rewards (no KL in the reward) counts its rewards.
    rollout.rewards_before_kl = None
    assert rollout_metrics(rollout, cfg, None)["zero_variance_frac"] == 0.0


def test_a_rollout_keeps_its_rewards_before_the_kl_shift(policy, tokenizer, tiny_model_dir, addition_files):
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():  # a reference the policy has moved away from: the KL is not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tied = [Reward("tied", lambda prompts, completions, **_: [1.0] * len(completions))]
    cfg = config(tiny_model_dir, addition_files, reward_kl_coef=0.5)
    rollout = collect_rollout(policy, reference, tokenizer, rows(cfg.prompts_per_step), tied, cfg,
                              torch.Generator().manual_seed(0))
    G = cfg.group_size
    assert torch.equal(rollout.rewards_before_kl, torch.ones(len(rollout)))
    assert not torch.equal(rollout.rewards, rollout.rewards_before_kl)  # the KL shifted them
    assert not algorithm.zero_variance_groups(rollout.rewards, G).all()
    m = rollout_metrics(rollout, cfg, None)
    assert m["zero_variance_frac"] == 1.0 and m["rewards/tied/zero_variance_frac"] == 1.0
    assert m["reward_kl"] != 0.0
    # Without the KL in the reward both are the same tensor of scores.
    plain = collect_rollout(policy, None, tokenizer, rows(cfg.prompts_per_step), tied,
                            config(tiny_model_dir, addition_files), torch.Generator().manual_seed(0))
    assert torch.equal(plain.rewards, plain.rewards_before_kl)


@pytest.fixture
def second_eos(policy, tokenizer):
    """The policy with a second EOS in its generation config: the token its greedy completion of
    the first prompt begins with (as a chat model lists <|im_end|> there)."""
    model = copy.deepcopy(policy)
    ids = torch.tensor([tokenizer("0+1=", add_special_tokens=False)["input_ids"]])
    first = LocalBackend(model, tokenizer).generate(ids, torch.ones_like(ids), SamplingParams.greedy(4))
    x = int(first.completion_ids[0, 0])
    assert x != tokenizer.eos_token_id and int(first.completion_mask[0].sum()) > 1
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, x]
    return model, x


def test_rewards_and_evaluation_read_completions_cut_at_any_stop_id(second_eos, tokenizer, tiny_model_dir,
                                                                    addition_files):
    model, x = second_eos
    seen = []

    def record(prompts, completions, **_):
        seen.extend(completions)
        return [0.0] * len(completions)

    rewards = [Reward("record", record)]
    cfg = config(tiny_model_dir, addition_files, eval_batch_size=2)
    backend = LocalBackend(model, tokenizer)
    result = evaluate(backend, tokenizer, rows(1), rewards, cfg)
    # Greedy: the first token is X, which now ends the completion; the text before it is empty.
    assert result["completions"] == [""] and seen == [""]
    written = tokenizer.convert_ids_to_tokens(x)

    seen.clear()
    rollout = collect_rollout(model, None, tokenizer, rows(2), rewards, cfg, torch.Generator().manual_seed(0),
                              backend=backend)
    assert seen == rollout.completions
    for row, text in enumerate(rollout.completions):
        n = int(rollout.lengths[row])
        last = int(rollout.completion_ids[row, n - 1])
        if not rollout.truncated[row] and last == x:  # ended by X: the text stops before it
            assert text == tokenizer.decode(rollout.completion_ids[row, :n - 1])
        assert not text.endswith(written) or rollout.truncated[row] or last != x
