"""The `grpo` command line: train, sft, demo, reward-model, report, config.

Each command's work lives in its own module; this file only parses arguments and turns the
library's input errors (grpo.errors) into one clear message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


# Libraries whose log records and warnings reach a user's terminal during a run. Their loggers
# are named after their packages; a library that sets no level of its own follows the root's.
THIRD_PARTY = ("transformers", "huggingface_hub", "datasets", "torch", "peft", "accelerate", "bitsandbytes",
               "kernels", "safetensors", "tokenizers", "filelock", "fsspec", "urllib3", "httpx", "matplotlib",
               "PIL", "numexpr", "vllm")


def quiet_libraries(verbose: bool = False) -> None:
    """Our commands print only our own lines: other libraries' warnings, log records below errors
    and progress bars are dropped, unless `verbose`. grpo's own loggers keep their warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
        return
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers first logs
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM sets its logger's level from it at import
    logging.getLogger().setLevel(logging.ERROR)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("grpo").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"grpo(\.|$)")
    if "transformers" in sys.modules:  # already imported: its own switches, not just the env
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


# Shown under each command's --help: a few real invocations, and where every key is described.
EPILOGS = {
    "train": """examples:
  grpo train --config my.yaml
  grpo train --config my.yaml --set beta=0 --set preset=dapo --set generation=beam
  grpo train --set model=Qwen/Qwen2.5-0.5B-Instruct --set dataset=data/train.jsonl \\
             --set 'rewards=[{function: my_rewards.py:accuracy}]' --set output_dir=runs/q
  grpo train --config my.yaml --resume          # continue the last checkpoint
  torchrun --nproc_per_node 8 -m grpo.cli train --config my.yaml

every key, its default and meaning: grpo config train  (grpo config train > my.yaml starts a config)
TRL's names work too (num_generations, loss_type, epsilon, reward_weights, ...): see docs/migrating-from-trl.md""",
    "sft": """examples:
  grpo sft --config sft.yaml
  grpo sft --set model=runs/base --set dataset=data/train.jsonl --set eval_dataset=data/test.jsonl

every key, its default and meaning: grpo config sft""",
    "demo": """examples:
  grpo demo                                # tiny model, supervised warm start, GRPO on addition
  grpo demo --task calculator              # an agent: 3-digit products through a multiply tool
  grpo demo --task steps                   # process supervision: a reward on every line of a chain
  grpo demo --pipeline seed --output-dir runs/seed

the settings it uses are in docs/getting-started.md ("The demo"); grpo config train / sft describe each key""",
    "reward-model": """examples:
  grpo reward-model make-preferences --config prefs.yaml
  grpo reward-model make-step-labels --config labels.yaml   # Math-Shepherd step labels for a process RM
  grpo reward-model train --config rm.yaml
  grpo reward-model eval --config eval.yaml
  grpo reward-model score --config score.yaml

every key: grpo config reward-model, grpo config reward-model-eval, grpo config make-preferences, grpo config
make-step-labels""",
    "config": """examples:
  grpo config train            # every key of grpo train, as a commented YAML file
  grpo config train > my.yaml  # a config to start from""",
}


def parser() -> argparse.ArgumentParser:
    from grpo import __version__
    from grpo.config import COMMANDS

    p = argparse.ArgumentParser(prog="grpo", description="Group Relative Policy Optimization for causal LMs",
                                epilog="each command's keys: grpo config train | sft | reward-model | "
                                       "reward-model-eval | make-preferences | make-step-labels; examples: grpo "
                                       "<command> --help")
    p.add_argument("--version", action="version", version=f"grpo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    # Every command takes --verbose, after its name as users type it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show other libraries' warnings, log records and progress bars")

    def command(name: str, **kw):
        return sub.add_parser(name, epilog=EPILOGS.get(name), formatter_class=argparse.RawDescriptionHelpFormatter,
                              parents=[common], **kw)

    t = command("train", help="train a policy with GRPO (or DAPO, Dr. GRPO, GSPO via preset)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even if the config or data differ from the checkpoint's")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run a non-empty output_dir holds (only ever what grpo wrote there)")
    t.add_argument("--quiet", action="store_true", help="no console output (metrics.jsonl is still written)")

    s = command("sft", help="supervised warm start on prompt/completion pairs")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run a non-empty output_dir holds (only ever what grpo wrote there)")
    s.add_argument("--quiet", action="store_true")

    d = command("demo", help="build a tiny model, warm it up, train it with GRPO: addition, a calculator "
                             "agent (--task calculator) or step-by-step arithmetic (--task steps)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--pipeline", choices=["grpo", "seed"], default="grpo",
                   help="grpo: exact-answer reward; seed: the seed notes' preferences -> reward model -> GRPO")
    d.add_argument("--feedback", choices=["pairs", "ranking"], default="pairs",
                   help="--pipeline seed: the reward model learns from preference pairs (Bradley-Terry) or from "
                        "rankings of each prompt's samples (Plackett-Luce)")
    d.add_argument("--task", choices=["addition", "calculator", "steps"], default="addition",
                   help="addition: two-number sums; calculator: 3-digit products solved by calling a multiply "
                        "tool (an agent run, docs/agents.md); steps: expressions evaluated one reduction per "
                        "line, with process supervision (docs/algorithms.md)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace what grpo wrote in a non-empty --output-dir (an earlier run of the same demo is "
                        "replaced anyway; files grpo did not write are never deleted)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a key of the GRPO stage (grpo config train), e.g. --set 'peft={r: 16, alpha: 32}'")
    d.add_argument("--quiet", action="store_true")

    rm = command("reward-model", help="train, evaluate and use reward models (pairs: Bradley-Terry; rankings: "
                                      "Plackett-Luce)")
    rm_sub = rm.add_subparsers(dest="rm_command", required=True)
    for name, text in (("train", "train a reward model on prompt/chosen/rejected pairs or prompt/completions "
                                 "rankings"),
                       ("eval", "pairwise accuracy and mean margin on a preference file; Kendall's tau, top-1 and "
                                "correct-vs-wrong accuracy on rankings"),
                       ("score", "score prompt/completion rows and write them to a file"),
                       ("make-preferences", "sample a policy on a built-in task and write preference pairs"),
                       ("make-step-labels", "label a policy's own steps by Monte-Carlo rollouts (Math-Shepherd) for "
                                            "a process reward model")):
        family = {"train": "reward-model", "make-preferences": "make-preferences",
                  "make-step-labels": "make-step-labels"}.get(name, "reward-model-eval")
        c = rm_sub.add_parser(name, help=text, epilog=f"every key, its default and meaning: grpo config {family}",
                              parents=[common])
        c.add_argument("--config", help="YAML config file")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        c.add_argument("--overwrite", action="store_true", help="replace what the output holds")
        c.add_argument("--quiet", action="store_true")
        if name == "make-preferences":
            c.add_argument("--rankings", type=int, metavar="K",
                           help="write one ranking of up to K samples per prompt instead of pairs (key rankings)")

    r = sub.add_parser("report", help="write report.html and PNG plots for one or more runs", parents=[common])
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--output", help="where to write report.html (default: the first run directory)")

    c = command("config", help="print every config key of a command with its default and meaning")
    c.add_argument("family", choices=list(COMMANDS), help="the command whose keys to print")
    return p


def main(argv: list[str] | None = None) -> int:
    # Before the parser imports any library: some read their switches from the environment once.
    quiet_libraries("--verbose" in (sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(argv)
    from grpo.errors import GrpoError, RewardError
    from grpo.runs.interrupts import Interrupted

    main_process = os.environ.get("RANK", "0") == "0"
    try:
        return run_command(args)
    except Interrupted as e:
        if main_process:
            print(f"grpo {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except GrpoError as e:
        # The same input error on every torchrun process is said once; a reward's may be one process's own.
        if main_process or isinstance(e, RewardError):
            print(f"grpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grpo {args.command}: stopped at once, without saving (checkpoints already written are kept)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `grpo config train | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # Python flushes stdout once more at exit
        return 0
    except OSError as e:  # a full disk, a permission, a missing file: the system's own one line
        print(f"grpo {args.command}: error: {e}", file=sys.stderr)
        return 1


# Each command's handler: it loads the command's config (file, then --set) and calls the library.
# The config file goes down with the config: an input of the run that no --overwrite may delete.

def _train(args) -> int:
    from grpo.config import TrainConfig, load_config
    from grpo.train.loop import train
    out = train(load_config(TrainConfig, args.config, args.set), resume=args.resume, quiet=args.quiet,
                overwrite=args.overwrite, allow_changes=args.allow_changes, config_path=args.config)
    if not args.quiet:
        print(f"model saved to {out}")
    return 0


def _sft(args) -> int:
    from grpo.config import SFTConfig, load_config
    from grpo.supervised.sft import train_sft
    out = train_sft(load_config(SFTConfig, args.config, args.set), quiet=args.quiet, overwrite=args.overwrite,
                    config_path=args.config)
    if not args.quiet:
        print(f"model saved to {out}")
    return 0


def _demo(args) -> int:
    from grpo.config import ConfigError, parse_overrides
    if args.feedback != "pairs" and args.pipeline != "seed":
        raise ConfigError("--feedback: only the seed pipeline (--pipeline seed) has a reward model to train")
    if args.pipeline == "seed":
        if args.task != "addition":
            raise ConfigError("--task: the seed pipeline runs on addition only")
        if args.set:
            raise ConfigError("--set: only the plain demo (--pipeline grpo) takes overrides; the seed "
                              "pipeline's settings are in grpo/recipes/pipeline.py")
        from grpo.recipes.pipeline import run_seed_pipeline
        run_seed_pipeline(args.output_dir, seed=args.seed, quiet=args.quiet, overwrite=args.overwrite,
                          feedback=args.feedback)
    elif args.task == "steps":
        from grpo.recipes.steps import run_steps_demo
        output_dir = "runs/steps" if args.output_dir == "runs/demo" else args.output_dir
        run_steps_demo(output_dir, seed=args.seed, quiet=args.quiet, overwrite=args.overwrite,
                       grpo_overrides=parse_overrides(args.set))
    elif args.task == "calculator":
        from grpo.recipes.calculator import run_calculator_demo
        output_dir = "runs/calculator" if args.output_dir == "runs/demo" else args.output_dir
        run_calculator_demo(output_dir, seed=args.seed, quiet=args.quiet, overwrite=args.overwrite,
                            grpo_overrides=parse_overrides(args.set))
    else:
        from grpo.recipes.demo import run_demo
        run_demo(args.output_dir, seed=args.seed, quiet=args.quiet, overwrite=args.overwrite,
                 grpo_overrides=parse_overrides(args.set))
    return 0


def _reward_model(args) -> int:
    from grpo.config import PreferenceConfig, RewardModelConfig, RewardModelEvalConfig, StepLabelConfig, load_config
    from grpo.recipes.preferences import make_preferences
    from grpo.recipes.step_labels import make_step_labels
    from grpo.supervised import reward_model as rm
    cls, run, writes = {
        "train": (RewardModelConfig, rm.train_reward_model, True),
        "eval": (RewardModelEvalConfig, rm.eval_reward_model, False),
        "score": (RewardModelEvalConfig, rm.score_file, True),
        "make-preferences": (PreferenceConfig, make_preferences, True),
        "make-step-labels": (StepLabelConfig, make_step_labels, True),
    }[args.rm_command]
    overrides = list(args.set) + ([f"rankings={args.rankings}"] if getattr(args, "rankings", None) is not None else [])
    cfg = load_config(cls, args.config, overrides)
    if writes:
        run(cfg, quiet=args.quiet, overwrite=args.overwrite, config_path=args.config)
    else:
        run(cfg, quiet=args.quiet)
    return 0


def _report(args) -> int:
    from grpo.observe.report import cli_main
    return cli_main(args)


def _config(args) -> int:
    from grpo.config import COMMANDS, describe
    cls, command = COMMANDS[args.family]
    print(describe(cls, command))
    return 0


HANDLERS = {"train": _train, "sft": _sft, "demo": _demo, "reward-model": _reward_model, "report": _report,
            "config": _config}


def run_command(args) -> int:
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
