"""`grpo demo --task calculator`: an agent task the tiny model solves only by calling a tool.

3-digit multiplication ("What is 123*456?"): far beyond a ~1M-parameter model's own arithmetic,
but the `multiply(a, b)` tool gives the product, so a model that calls it with the right numbers
and copies its result answers exactly. The reward is 1 when the final assistant message is the
product.

1. Build the tiny model with a character tokenizer whose chat template shows tools and renders
   tool calls Hermes-style (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`).
2. Warm it up on synthetic episodes (call, result, answer), trained on the model's turns only
   (the episodes' loss mask), and stopped while it still miscopies numbers often.
3. GRPO with `tools: [grpo.recipes.calculator:multiply]`: each episode runs the tool for real.
4. Greedy held-out success before and after GRPO.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from grpo.config import TrainConfig, build
from grpo.train.loop import train

from .addition import claim_recipe_dir
from .tasks import build_char_tokenizer, build_tiny_model

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# A short Hermes-style template: the tools' names in a system turn, calls as JSON in <tool_call>
# blocks, results in a tool turn.
TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\ntools:' }}{% for t in tools %}{{ ' ' + t.function.name }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + m.content }}"
    "{% for c in m.tool_calls or [] %}{% set f = c.function if c.function is defined else c %}"
    "{{ '<tool_call>{\"name\": \"' + f.name + '\", \"arguments\": ' + f.arguments | tojson + '}</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif m.role == 'tool' %}"
    "{{ '<|im_start|>tool\\n<tool_response>' + m.content + '</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Smaller than the addition demo's model: its episodes are ten times longer.
MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_positions=256)
# The warm start stops once it solves a quarter of a probe of training problems, while it still
# miscopies numbers in most episodes: room for GRPO. Copying is learnt within a few dozen steps
# once it starts, so the probe runs every 5 steps (every 25 can stop it near its ceiling) and
# holds 64 problems (32 put a quarter within a few lucky episodes).
WARM = dict(steps=1000, batch_size=32, learning_rate=3e-3, target=0.25, every=5, probe=64)
# Sampling at temperature 0.5: a half-trained copier sampled at 1 rarely gets every digit of a
# call and an answer right, so nearly all its groups tie at 0 and teach nothing. A warm start
# that stops low copies well only after a few hundred steps: 400 leave the slower seeds room.
GRPO = dict(max_steps=400, prompts_per_step=8, group_size=8, max_completion_length=128, max_turns=3,
            learning_rate=3e-4, warmup_steps=5, lr_scheduler="constant", temperature=0.5, beta=0.0,
            micro_batch_size=64, logging_steps=5, eval_steps=0, samples_steps=0, save_steps=0,
            tools=["grpo.recipes.calculator:multiply"],
            rewards=[{"function": "grpo.recipes.calculator:final_answer"}], accuracy_reward="final_answer")
HELDOUT = 100


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return int(a) * int(b)


def final_answer(completions, answer, **kwargs) -> list[float]:
    """1 when the final assistant message is exactly the answer, else 0."""
    out = []
    for messages, expected in zip(completions, answer):
        said = [m for m in messages if m.get("role") == "assistant"]
        out.append(float(bool(said) and str(said[-1].get("content", "")).strip() == str(expected)))
    return out


def build_tokenizer():
    """A character tokenizer with the chat turns' special tokens and the tool-call tags."""
    out = build_char_tokenizer(CHARS, special=SPECIAL, added=ADDED, eos="<|im_end|>", name="tiny-calculator")
    out.chat_template = TEMPLATE
    return out


def problems(seed: int = 0, heldout: int | None = None) -> tuple[list[dict], list[dict]]:
    """3-digit products as chat prompts, split into train and a disjoint held-out set (HELDOUT rows)."""
    heldout = HELDOUT if heldout is None else heldout
    rng = random.Random(seed)
    pairs = {(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(6000)}
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "answer": str(a * b)} for a, b in pairs]
    return rows[heldout:], rows[:heldout]


def episode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """A solved episode's tokens (prompt, call, result, answer) and its loss mask: 1 on the
    model's two turns, as grpo.agents.run_episodes would mask them."""
    a, b = (int(x) for x in row["prompt"][-1]["content"].split("*"))
    schema = [{"type": "function", "function": {"name": "multiply"}}]
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}]}
    steps = [row["prompt"], [call], [{"role": "tool", "name": "multiply", "content": str(a * b)}],
             [{"role": "assistant", "content": row["answer"]}]]
    ids, mask, messages = [], [], []
    for i, new in enumerate(steps):
        messages = messages + new
        rendered = tokenizer.apply_chat_template(messages, tools=schema, tokenize=True, return_dict=False,
                                                 add_generation_prompt=i % 2 == 0)
        # The model's turns end at <|im_end|>; the newline after it is the template's.
        if i % 2 == 1:
            rendered = rendered[:rendered.index(tokenizer.eos_token_id, len(ids)) + 1]
        mask += [i % 2] * (len(rendered) - len(ids))
        ids = rendered
    return ids, mask


def probe_success(model, tokenizer, rows: list[dict]) -> float:
    """The fraction of `rows` whose greedy episode ends with the right answer."""
    from grpo.agents import backend_generate, run_episodes
    from grpo.engine.backend import LocalBackend, SamplingParams

    backend = LocalBackend(model, tokenizer)
    generate = backend_generate(backend, tokenizer, SamplingParams.greedy(GRPO["max_completion_length"]))
    with torch.no_grad():
        episodes = run_episodes(tokenizer, [r["prompt"] for r in rows], generate, tools=[multiply],
                                max_turns=GRPO["max_turns"], max_completion_length=GRPO["max_completion_length"],
                                stop_token_ids=backend.stop_token_ids)
    return sum(final_answer([e.completion for e in episodes], [r["answer"] for r in rows])) / len(rows)


def warm_start(model, tokenizer, rows: list[dict], seed: int, steps: int, batch_size: int,
               learning_rate: float, target: float = 0.0, every: int = 25, probe: int = 32) -> int:
    """Supervised steps on solved episodes, the loss on the model's turns only. With `target`,
    stop as soon as greedy success on `probe` training rows reaches it (checked every `every`
    steps; at most `steps`): the point where the copying is half learnt moves a lot between
    seeds. Returns the steps taken."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    probe_rows = rows[:probe]
    model.train()
    for step in range(1, steps + 1):
        batch = [episode(tokenizer, r) for r in rng.sample(rows, batch_size)]
        T = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (T - len(x)) for x, _ in batch])
        mask = torch.tensor([m + [0] * (T - len(m)) for _, m in batch])
        attention = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if target and step % every == 0:
            model.eval()
            if probe_success(model, tokenizer, probe_rows) >= target:
                return step
            model.train()
    model.eval()
    return steps


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_calculator_demo(output_dir: str = "runs/calculator", seed: int = 0, quiet: bool = False,
                        grpo_overrides: dict | None = None, warm_overrides: dict | None = None,
                        overwrite: bool = False) -> dict:
    """Everything under `output_dir`: sft/ (the warm-started tiny model), data/, grpo/ (the GRPO
    run) and summary.json with held-out success before and after GRPO."""
    out = Path(output_dir)
    # One intra-op thread: a model this small gains nothing from more, and on a busy CPU every
    # OpenMP barrier between them can stall.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, seed, quiet, grpo_overrides, warm_overrides, overwrite)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, seed: int, quiet: bool, grpo_overrides: dict | None, warm_overrides: dict | None,
         overwrite: bool) -> dict:
    with claim_recipe_dir(out, "calculator demo", overwrite):
        start = time.time()
        say = (lambda *a: None) if quiet else print
        tokenizer = build_tokenizer()
        eos = tokenizer.eos_token_id
        model = build_tiny_model(len(tokenizer), **MODEL, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                 seed=seed)
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        train_rows, heldout_rows = problems(seed)
        warm = WARM | (warm_overrides or {})
        say(f"[calculator] supervised warm start on solved episodes under {out}")
        torch.manual_seed(seed)
        warm_steps = warm_start(model, tokenizer, train_rows, seed, **warm)
        model.save_pretrained(out / "sft")
        tokenizer.save_pretrained(out / "sft")
        warm_seconds = time.time() - start
        cfg = build(TrainConfig, {"model": str(out / "sft"), "dataset": str(write_rows(train_rows, out / "data" /
                                                                                       "train.jsonl")),
                                  "eval_dataset": str(write_rows(heldout_rows, out / "data" / "heldout.jsonl")),
                                  "eval_max_prompts": len(heldout_rows), "output_dir": str(out / "grpo"),
                                  "seed": seed, **GRPO, **(grpo_overrides or {})}, "calculator demo")
        say("[calculator] GRPO with the multiply tool (grpo train)")
        train(cfg, quiet=quiet)
        run = json.loads((out / "grpo" / "summary.json").read_text())
        summary = {"success_before": run["eval_before"]["eval_accuracy"],
                   "success_after": run["eval_after"]["eval_accuracy"], "heldout_prompts": len(heldout_rows),
                   "warm_seconds": warm_seconds, "train_seconds": run["train_seconds"],
                   "total_seconds": time.time() - start, "model": str(out / "grpo"),
                   "warm_steps": warm_steps, "warm": warm, "grpo": GRPO | (grpo_overrides or {})}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"[calculator] held-out success on {len(heldout_rows)} problems: {summary['success_before']:.1%} -> "
            f"{summary['success_after']:.1%} (total {summary['total_seconds']:.0f}s)")
        return summary
