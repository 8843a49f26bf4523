"""TRL's and Hugging Face's spellings of our keys, turned into ours before a config is checked.

A plain rename is an `ALIASES` entry of the config class (`num_generations` -> `group_size`).
The keys here need more than a rename: one TRL key setting two of ours (`epsilon`), a choice
whose values are spelled differently (`loss_type`, `scale_rewards: true`), or a dict whose
entries land on several keys (`generation_kwargs`). Each translation refuses to contradict a key
the user also gave. docs/migrating-from-trl.md lists them all.
"""

from __future__ import annotations

from typing import Any

from grpo.errors import ConfigError

# TRL's loss_type -> (loss_aggregation, policy_loss or None).
LOSS_TYPES = {"grpo": ("sequence_mean", None), "dapo": ("token_mean", None), "bnpo": ("token_mean", None),
              "dr_grpo": ("constant_normalizer", None), "cispo": ("token_mean", "cispo")}
# generation_kwargs entries that have a key here (TRL: they override the config's own values).
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_completion_length",
                   "max_tokens": "max_completion_length"}

# For `grpo config train` (loading.describe) and docs/migrating-from-trl.md.
LOOP_KEYS = {
    "bf16 / fp16": "true sets dtype to bfloat16 / float16 (false leaves dtype as it is)",
    "lr_scheduler_type": "lr_scheduler; `constant_with_warmup` is our `constant` (which warms up first)",
}
TRAIN_KEYS = {
    **LOOP_KEYS,
    "epsilon": "epsilon_low, and epsilon_high unless that is given too",
    "loss_type": "grpo -> loss_aggregation sequence_mean; dapo and bnpo -> token_mean (ours is normalised "
                 "over the whole batch); dr_grpo -> constant_normalizer; cispo -> policy_loss cispo with "
                 "token_mean",
    "scale_rewards": "advantage_estimator; true is `group`, false is `none`",
    "reward_weights": "one weight per entry of rewards (reward_funcs), in order",
    "max_tool_calling_iterations": "max_turns - 1 (the tool rounds after the first turn)",
    "generation_kwargs": "its temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens / "
                         "max_tokens entries override those keys (as in TRL); other entries are refused",
    "delta, min_p: null": "null is 0 (off)",
    "peft_config": "peft: a peft.LoraConfig (or a dict of its fields): r, lora_alpha, lora_dropout, target_modules",
    "model_name_or_path": "model (TRL's ModelConfig)",
    "use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules": "peft {r, alpha, dropout, target_modules} "
        "(TRL's ModelConfig; its defaults r 16, alpha 32, dropout 0.05)",
    "load_in_4bit, bnb_4bit_quant_type, use_bnb_nested_quant": "peft.quantization (nf4 by default, as TRL) and "
        "peft.double_quant; with use_peft (a 4-bit base trains through an adapter)",
    "attn_implementation, trust_remote_code": "model_init_kwargs entries (TRL's ModelConfig)",
}
# TRL's ModelConfig (the model half of its scripts' YAML recipes): LoRA fields -> our peft keys,
# with TRL's defaults where use_peft is on and a field is not given.
MODEL_CONFIG_LORA = {"lora_r": ("r", 16), "lora_alpha": ("alpha", 32), "lora_dropout": ("dropout", 0.05),
                     "lora_target_modules": ("target_modules", None)}
MODEL_CONFIG_4BIT = ("load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant")


def _conflict(values: dict, source: str, trl_key: str, *keys: str) -> None:
    given = [k for k in keys if k in values]
    if given:
        raise ConfigError(f"{source}: {trl_key} (TRL's name) sets {', '.join(keys)}, which the config also "
                          f"sets ({', '.join(given)}); give one")


def translate_loop_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    values = dict(values)
    for flag, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if flag in values:
            on = values.pop(flag)
            if not isinstance(on, bool):
                raise ConfigError(f"{source}: {flag}: expected true or false, got {on!r}")
            if on:
                _conflict(values, source, flag, "dtype")
                values["dtype"] = dtype
    if values.get("lr_scheduler") == "constant_with_warmup":
        values["lr_scheduler"] = "constant"
    return values


def translate_train_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    values = translate_loop_keys(values, source)
    if "epsilon" in values:
        _conflict(values, source, "epsilon", "epsilon_low")
        epsilon = values.pop("epsilon")
        values["epsilon_low"] = epsilon
        values.setdefault("epsilon_high", epsilon)
    if "loss_type" in values:
        loss_type = values.pop("loss_type")
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"{source}: loss_type: {loss_type!r} has no equivalent here; TRL's "
                              f"{', '.join(LOSS_TYPES)} do (or set loss_aggregation and policy_loss)")
        aggregation, policy_loss = LOSS_TYPES[loss_type]
        _conflict(values, source, "loss_type", "loss_aggregation", *(["policy_loss"] if policy_loss else []))
        values["loss_aggregation"] = aggregation
        if policy_loss:
            values["policy_loss"] = policy_loss
    if isinstance(values.get("advantage_estimator"), bool):  # scale_rewards: true / false
        values["advantage_estimator"] = "group" if values["advantage_estimator"] else "none"
    for key in ("delta", "min_p"):
        if key in values and values[key] is None:
            values[key] = 0.0
    if values.get("num_generations_eval", 0) is None:
        values.pop("num_generations_eval")
    if "max_tool_calling_iterations" in values:  # TRL counts the tool rounds after the first turn
        _conflict(values, source, "max_tool_calling_iterations", "max_turns")
        iterations = values.pop("max_tool_calling_iterations")
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
            raise ConfigError(f"{source}: max_tool_calling_iterations: expected an integer >= 0, got {iterations!r}")
        values["max_turns"] = iterations + 1
    if "reward_weights" in values:
        values["rewards"] = _weighted(values.pop("reward_weights"), values.get("rewards"), source)
    kwargs = values.get("generation_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{source}: generation_kwargs: expected a mapping, got {kwargs!r}")
    unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise ConfigError(f"{source}: generation_kwargs: {unknown} have no equivalent in this sampler; it takes "
                          f"{', '.join(GENERATION_KEYS)} (beam search is `generation: beam`)")
    for name, value in kwargs.items():
        values[GENERATION_KEYS[name]] = value
    if "peft_config" in values:
        _conflict(values, source, "peft_config", "peft")
        values["peft"] = _lora(values.pop("peft_config"), source)
    return _model_config(values, source)


def _model_config(values: dict[str, Any], source: str) -> dict[str, Any]:
    """TRL's ModelConfig keys (`use_peft`, `lora_r`, `load_in_4bit`, ...) as ours."""
    if "model_name_or_path" in values:
        _conflict(values, source, "model_name_or_path", "model")
        values["model"] = values.pop("model_name_or_path")
    for key in ("attn_implementation", "trust_remote_code"):
        if key in values:
            kwargs = dict(values.get("model_init_kwargs") or {})
            if key in kwargs:
                raise ConfigError(f"{source}: {key} (TRL's ModelConfig) is also in model_init_kwargs; give one")
            kwargs[key] = values.pop(key)
            values["model_init_kwargs"] = kwargs
    if "load_in_8bit" in values:
        if values.pop("load_in_8bit"):
            raise ConfigError(f"{source}: load_in_8bit: 8-bit bases are not offered; load_in_4bit (QLoRA, "
                              "peft.quantization) is")
    lora = {k: values.pop(k) for k in list(MODEL_CONFIG_LORA) if k in values}
    four_bit = {k: values.pop(k) for k in MODEL_CONFIG_4BIT if k in values}
    for key in ("load_in_4bit", "use_bnb_nested_quant", "use_peft"):
        value = four_bit.get(key, values.get(key, False))
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
    if "use_peft" not in values:
        if lora or four_bit.get("load_in_4bit"):
            given = ", ".join(sorted(lora) + (["load_in_4bit"] if four_bit.get("load_in_4bit") else []))
            raise ConfigError(f"{source}: {given} (TRL's ModelConfig) take effect only with use_peft: true; add it "
                              "(our own keys: peft {r, alpha, dropout, target_modules, quantization})")
        return values
    use_peft = values.pop("use_peft")
    if not use_peft:
        if four_bit.get("load_in_4bit"):
            raise ConfigError(f"{source}: load_in_4bit: a 4-bit base trains only through an adapter; "
                              "set use_peft: true")
        if values.get("peft"):
            raise ConfigError(f"{source}: use_peft: false (TRL's name) contradicts peft, which the config "
                              "sets; give one")
        return values
    _conflict(values, source, "use_peft", "peft")
    peft = {ours: lora.get(theirs, default) for theirs, (ours, default) in MODEL_CONFIG_LORA.items()}
    if four_bit.get("load_in_4bit"):
        peft["quantization"] = four_bit.get("bnb_4bit_quant_type", "nf4")
        peft["double_quant"] = bool(four_bit.get("use_bnb_nested_quant", False))
    values["peft"] = peft
    return values


# A peft.LoraConfig's fields -> our `peft` keys; any other field must keep peft's default.
LORA_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}
LORA_DEFAULTS = {"bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None,
                 "layers_to_transform": None, "init_lora_weights": True}


def _lora(config, source: str) -> dict:
    """TRL's `peft_config` (a peft.LoraConfig, or a dict of its fields) as our `peft` mapping."""
    fields = config.to_dict() if hasattr(config, "to_dict") else config
    lora = str(getattr(config, "peft_type", "LORA")) in ("LORA", "PeftType.LORA")
    if not isinstance(fields, dict) or not lora:
        raise ConfigError(f"{source}: peft_config: expected a peft.LoraConfig (or a dict of its fields), "
                          f"got {config!r}")
    differ = sorted(k for k, default in LORA_DEFAULTS.items() if k in fields and fields[k] != default)
    if differ:
        raise ConfigError(f"{source}: peft_config: {differ} are not supported here (only "
                          f"{', '.join(LORA_FIELDS)}); leave them at peft's defaults")
    # target_modules None is peft's per-architecture default (q_proj, v_proj for Llama), as in TRL.
    out = {ours: fields[theirs] for theirs, ours in LORA_FIELDS.items() if theirs in fields}
    if isinstance(out.get("target_modules"), (set, frozenset)):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def _weighted(weights, rewards, source: str) -> list:
    if not isinstance(weights, list) or not isinstance(rewards, list) or len(weights) != len(rewards):
        raise ConfigError(f"{source}: reward_weights: expected one number per entry of rewards "
                          f"({len(rewards) if isinstance(rewards, list) else 0}), got {weights!r}")
    out = []
    for i, (w, entry) in enumerate(zip(weights, rewards)):
        if isinstance(entry, dict):
            if "weight" in entry:
                raise ConfigError(f"{source}: rewards[{i}] has a weight and reward_weights gives one too; give one")
            out.append({**entry, "weight": w})
        else:  # a function spec or a Python callable
            out.append({"function": entry, "weight": w})
    return out
