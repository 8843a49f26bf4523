"""grpo: Group Relative Policy Optimization for Hugging Face causal language models.

GRPO was introduced in DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) and used with rule-based
rewards by DeepSeek-R1 (DeepSeek-AI 2025, arXiv:2501.12948).

Layers, each a subpackage whose imports point only downward (docs/design.md):

    algorithm  the maths: advantages, policy losses, KL, aggregation (pure, registries)
    engine     models, generation behind the rollout backend, log-probs, packed forwards
    data       dataset rows, prompt text and tokens, the draw order
    config     one typed config per command family, the single place a choice is made
    rewards    reward functions, reward models, preference pairs
    agents     multi-turn episodes: tools, environments, the token-exact loop and its loss mask
    observe    metrics files, the console, the HTML report
    runtime    what every training command shares: device, processes, sharding, precision, optimizer
    runs       a run's files: output directory, checkpoints, inputs, interrupts, the model card
    train      the GRPO step: the loop, rollout, update, evaluation, reference sync, iterative RL
    supervised the other training commands: SFT and reward-model training
    recipes    built-in tasks, the demo and the seed notes' pipeline
    cli        the `grpo` command
"""

import logging

__version__ = "0.1.0"

# bitsandbytes (QLoRA's extra), imported by peft whenever it is installed, warns on CPUs with
# AVX512-BF16 that an optional package for its packed 4-bit inference kernel is missing. grpo
# switches that packed layout off (it breaks training: engine.models.keep_trainable_layout), so
# the warning is noise on every run's stderr; its module's other warnings go with it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
