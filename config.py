"""
config.py: the run's configuration: one dataclass per concern (model, data, rl, phase2, run), command-line flags
generated from the fields (each with its help; booleans as --x / --no-x), named presets that fill them, and the
checks that turn a bad value into one clear error before any work starts.

    cfg = make_config(["--preset", "qwen2.5-vl-3b", "--model", "/ckpt/Qwen2.5-VL-3B-Instruct"])
    stages, groups, steps = validate(cfg)          # per-stage values resolved; ValueError on a bad config

Precedence: defaults (the tiny preset) <- preset <- flags; the resolved config is printed and checkpointed (as_dict).
"""
import argparse
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import torch

import curriculum
import runtime

def arg(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class ModelConfig:
    model: str = arg("assets/tiny-base", "base model: a local Qwen2.5-VL / Qwen2-VL folder, or 'tiny' (random)")
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg("auto", "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16: bf16 compute with fp32 "
                             "master weights and optimizer state (optim.py)")
    attn: str = arg("sdpa", "attention kernels: sdpa | flash_attention_2 (needs the flash-attn package) | eager")
    grad_checkpointing: bool = arg(False, "recompute each layer in backward: far less activation memory, ~1/3 "
                                          "more update time")
    shard: str = arg("none", "what is split over the ranks: none (DDP) | optimizer (fp32 masters, gradients and "
                             "moments: optim.ShardedAdamW) | fsdp (the parameters too: torch FSDP2, fsdp.py)")
    max_pixels: int = arg(401_408, "images are resized to at most this many pixels (the model card's value)")
    cuda_graphs: bool = arg(False, "decode steps replayed as CUDA graphs, one per batch size (rollout.FixedStep; "
                                   "GPU only, not with --shard fsdp)")

@dataclass
class DataConfig:
    stage_data: str = arg("", "per-stage files 'judge=a.jsonl;choice=b.jsonl;open=c.jsonl' (mixture specs); "
                              "stages without files derive their questions from the synthetic pool")
    image_root: str = arg("", "folder that relative image paths in data files are relative to")
    pool_size: int = arg(3000, "synthetic training pool: rows (scenes with one question each)")
    image_size: int = arg(112, "synthetic image side in pixels (a multiple of 28)")
    eval_data: str = arg("", "evaluation files 'test=a.jsonl;ood=b.jsonl'; empty: the synthetic test and ood splits")
    eval_n: int = arg(1200, "synthetic evaluation rows per split and form (400 per task; 0: no evaluation)")
    eval_stages: str = arg("judge,choice,open", "answer forms evaluated (the synthetic sets)")

@dataclass
class RLConfig:
    stages: str = arg("judge,choice,open", "the curriculum, in order ('open' alone = RL without curriculum; 'mixed': "
                                           "one stage whose batches ask the three forms in turn)")
    group_size: str = arg("8", "G answers per prompt: one value, or one per stage ('4,2,4')")
    stage_steps: str = arg("100,100,200", "optimizer steps per stage: one value or one per stage")
    prompts_per_step: int = arg(32, "prompts per optimizer step, over all ranks")
    micro_batch: int = arg(32, "prompts per forward/backward pass on one rank (memory only)")
    max_new_tokens: int = arg(64, "answer length limit")
    temperature: float = arg(1.0, "sampling temperature")
    lr: float = arg(3e-4, "AdamW learning rate")
    schedule: str = arg("linear", "learning-rate decay within each stage: constant | linear | cosine")
    warmup: int = arg(5, "warm-up steps at the start of each stage")
    grad_clip: float = arg(1.0, "gradient norm clip")
    beta: float = arg(0.04, "KL coefficient (k3 estimator)")
    clip_eps: float = arg(0.2, "PPO ratio clip")
    mu: int = arg(1, "optimizer steps per rollout batch (1: the release, ratio = 1)")
    agg: str = arg("seq", "loss aggregation: seq (paper) | token (DAPO) | dr_grpo")
    ref: str = arg("stage", "reference model: stage (each stage's starting weights, the release) | base")
    replay: str = arg("0", "open questions rehearsed per judge/choice prompt, added to its batches (not in the "
                              "paper: 0); one value for the stages of a schedule with an open stage, or one per stage")
    choice_partial: float = arg(0.2, "reward of a non-empty proper subset of the right letters (paper 0.2, release 0)")
    box_reward: str = arg("hard", "open detection reward: hard (1 if IoU > 0.5, the paper) | iou | giou")

@dataclass
class Phase2Config:
    phase2: bool = arg(True, "run rejection-sampling SFT after the open stage")
    phase2_data: str = arg("", "phase-2 prompts (a mixture spec); empty: the last phase2_prompts pool rows, all forms")
    phase2_prompts: int = arg(300, "prompts sampled in phase 2 (synthetic pool)")
    phase2_samples: int = arg(4, "answers sampled per prompt")
    phase2_bar: float = arg(2.0, "keep the best answer of a prompt when its reward (accuracy + format) >= this")
    phase2_lr: float = arg(1e-4, "SFT learning rate (the paper: 2e-7 for the 3B model)")
    phase2_epochs: int = arg(2, "SFT passes over the kept answers")
    phase2_batch: int = arg(32, "SFT rows per optimizer step, over all ranks")

@dataclass
class RunConfig:
    out: str = arg("runs/tiny", "output folder: checkpoints, logs, stages, report")
    seed: int = arg(0, "seed of data order, sampling and initial weights")
    resume: bool = arg(False, "continue from the latest checkpoint in --out")
    ckpt_every: int = arg(20, "steps between checkpoints (and at every stage end)")
    keep: int = arg(2, "checkpoints kept")
    sample_every: int = arg(10, "steps between dumps of sampled answers to samples.jsonl (0: none)")
    max_bad_steps: int = arg(5, "consecutive non-finite steps before the run stops")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")

@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    run: RunConfig = field(default_factory=RunConfig)

PRESETS = {
    "tiny": {},  # the defaults above
    "qwen2.5-vl-3b": {
        "model": {"model": "", "dtype": "bfloat16", "grad_checkpointing": True, "shard": "optimizer"},
        "rl": {"group_size": "4,2,4", "stage_steps": "600,500,2300", "prompts_per_step": 8, "micro_batch": 1,
               "max_new_tokens": 256, "lr": 1e-6, "schedule": "linear", "warmup": 0, "beta": 0.04, "mu": 1,
               "choice_partial": 0.0, "box_reward": "hard"},
        "phase2": {"phase2_lr": 2e-7, "phase2_samples": 4, "phase2_epochs": 1, "phase2_batch": 8},
        "run": {"out": "runs/qwen2.5-vl-3b", "ckpt_every": 100, "sample_every": 20},
    },
}
# The release's 7B run: 16 prompts per step (2 nodes x 8 GPUs), G = 4 in every stage, FSDP; the 3B preset's
# stage lengths in prompts (half the steps at twice the prompts per step).
PRESETS["qwen2.5-vl-7b"] = {**PRESETS["qwen2.5-vl-3b"],
                            "model": {**PRESETS["qwen2.5-vl-3b"]["model"], "shard": "fsdp"},
                            "rl": {**PRESETS["qwen2.5-vl-3b"]["rl"], "group_size": "4", "stage_steps": "300,250,1150",
                                   "prompts_per_step": 16},
                            "phase2": {**PRESETS["qwen2.5-vl-3b"]["phase2"], "phase2_batch": 16},
                            "run": {**PRESETS["qwen2.5-vl-3b"]["run"], "out": "runs/qwen2.5-vl-7b"}}
CHOICES = {"dtype": ("auto", "float32", "bfloat16"), "shard": ("none", "optimizer", "fsdp"),
           "attn": ("sdpa", "flash_attention_2", "eager"),
           "schedule": ("constant", "linear", "cosine"), "agg": ("seq", "token", "dr_grpo"), "ref": ("stage", "base"),
           "box_reward": ("hard", "iou", "giou")}

def add_flags(parser, group, fields=None):
    """One flag per field of Config's `group` (or of those named in `fields`), stored as "group.field"; None
    when not given, so that a preset's value is kept."""
    g = parser.add_argument_group(group)
    for f in dataclasses.fields(type(getattr(Config(), group))):
        if fields is None or f.name in fields:
            flag = "--" + f.name.replace("_", "-")
            kw = dict(dest=f"{group}.{f.name}", default=None, help=f"{f.metadata['help']} (default: {f.default})")
            if isinstance(f.default, bool):
                g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            else:
                g.add_argument(flag, type=type(f.default), choices=CHOICES.get(f.name), metavar=f.name.upper(), **kw)

def apply_flags(cfg, args):
    """cfg with every "group.field" value of the parsed `args` that was given."""
    for key, value in vars(args).items():
        if "." in key and value is not None:
            group, name = key.split(".")
            setattr(cfg, group, dataclasses.replace(getattr(cfg, group), **{name: value}))
    return cfg

def make_config(argv=None):
    """Defaults <- preset <- flags, then validated. Invalid values raise ValueError before any work."""
    p = argparse.ArgumentParser(description="Curr-ReFT: curriculum GRPO + rejection-sampling SFT for Qwen-VL.")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named recipe the flags override")
    for group in dataclasses.fields(Config):
        add_flags(p, group.name)
    args = p.parse_args(argv)
    cfg = Config()
    for group, values in PRESETS[args.preset].items():
        setattr(cfg, group, dataclasses.replace(getattr(cfg, group), **values))
    validate(apply_flags(cfg, args))
    return cfg

# What a resumed run may set anew: where and how fast it runs, its logs and evaluation, and phase 2 (after RL). Any
# other value changes the RL run itself (its batches, rewards or updates), which a resume must continue as it was;
# --shard too, since the checkpoint holds the optimizer state in the mode's layout.
RESUME_MAY_CHANGE = {"model": ("device", "attn", "grad_checkpointing", "cuda_graphs"),
                     "data": ("eval_data", "eval_n", "eval_stages"), "rl": ("micro_batch",),
                     "phase2": tuple(f.name for f in dataclasses.fields(Phase2Config)),
                     "run": ("out", "resume", "ckpt_every", "keep", "sample_every", "max_bad_steps", "threads")}

def check_resume(saved, cfg):
    """A ValueError naming the first flag whose value is not that of the run being resumed (saved: its as_dict)."""
    stages = [s.strip() for s in cfg.rl.stages.split(",") if s.strip()]

    def same(name, was, value):  # a per-stage value, as each stage takes it: "12" is "12,12,12" for 3 stages
        if name in ("group_size", "stage_steps", "replay") and was != value:
            cast = float if name == "replay" else int
            try:
                return per_stage(was, stages, name, cast) == per_stage(value, stages, name, cast)
            except ValueError:
                return False
        return was == value

    for group, values in as_dict(cfg).items():
        for name, value in values.items():
            was = saved.get(group, {}).get(name, value)
            if name not in RESUME_MAY_CHANGE[group] and not same(name, was, value):
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: the run in --out was started with {was!r}; "
                                 f"resume it with that (only {resume_flags()} may change), or give another --out")

def resume_flags():
    """The flags that RESUME_MAY_CHANGE names, as a user types them (phase 2's as --phase2 and --phase2-*)."""
    names = [n for g, ns in RESUME_MAY_CHANGE.items() if g != "phase2" for n in ns if n != "resume"]
    return ", ".join(f"--{n.replace('_', '-')}" for n in names) + ", --phase2 and --phase2-*"

def reward_options(rl):
    """The options of rewards.score that the RL flags set: the RL stages' rule rewards, which phase 2 keeps to."""
    return {"choice_partial": rl.choice_partial, "box_mode": rl.box_reward}

def per_stage(text, stages, name, cast=int):
    """'4' -> [4] * len(stages); '4,2,4' -> one value per stage. Three values name the judge, choice and open
    stages, so a run of some of them, or of them in another order, takes theirs: '100,100,150' -> [150] for
    'open', [150, 100, 100] for 'open,choice,judge'."""
    flag = f"--{name.replace('_', '-')} {text!r}"
    try:
        values = [cast(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: give {'whole numbers' if cast is int else 'numbers'}, comma-separated") from None
    if len(values) == 1:
        values = values * len(stages)
    elif len(values) == len(curriculum.STAGES) and all(s in curriculum.STAGES for s in stages):  # in any order
        values = [values[curriculum.STAGES.index(s)] for s in stages]
    if len(values) != len(stages):
        raise ValueError(f"{flag}: give one value or one per stage ({len(stages)})")
    return values

def replay_ratios(rl, stages):
    """Per-stage replay ratios (curriculum.StageSpec.replay); one value applies to every stage but open, and to none
    without an open stage. Each stage's extra ratio * prompts_per_step prompts must be whole, the sum split evenly."""
    ratios = per_stage(rl.replay, stages, "replay", cast=float)
    if len(str(rl.replay).split(",")) == 1:
        ratios = [0.0 if name == "open" or "open" not in stages else v for name, v in zip(stages, ratios)]
    if not all(0 <= v <= 4 for v in ratios):
        raise ValueError(f"--replay {rl.replay!r}: open questions per stage prompt, in [0, 4]")
    if any(v > 0 for v in ratios) and "open" not in stages:
        raise ValueError("--replay asks open questions in earlier stages; --stages must include open")
    W = int(os.environ.get("WORLD_SIZE", 1))
    for v in filter(None, ratios):  # (no replay: validate checks --prompts-per-step itself)
        extra = Fraction(v).limit_denominator(1000) * rl.prompts_per_step
        if extra.denominator != 1 or (rl.prompts_per_step + extra) % W:
            raise ValueError(f"--replay {v} adds {float(extra):g} open questions to {rl.prompts_per_step} prompts: "
                             f"make it a whole number and the sum a multiple of the {W} processes")
    return ratios

def validate(cfg):
    """(stages, group sizes, steps), one value per stage; a ValueError naming the flag to fix on a bad config."""
    rl, run, p2, model = cfg.rl, cfg.run, cfg.phase2, cfg.model
    stages = [s.strip() for s in rl.stages.split(",") if s.strip()]
    if not stages or any(s not in curriculum.SCHEDULE for s in stages):
        raise ValueError(f"--stages {rl.stages!r}: use judge, choice, open (or mixed), comma-separated")
    groups, steps = per_stage(rl.group_size, stages, "group_size"), per_stage(rl.stage_steps, stages, "stage_steps")
    replay_ratios(rl, stages)
    forms = cfg.data.eval_stages.split(",")
    bad_forms = [s for s in forms if s not in curriculum.STAGES] + [s for s in set(forms) if forms.count(s) > 1]
    W = int(os.environ.get("WORLD_SIZE", 1))
    runtime.check_device(model.device)
    infinite = [f"--{f.name.replace('_', '-')} {getattr(g, f.name)}" for g in (cfg.model, cfg.data, rl, p2, run)
                for f in dataclasses.fields(g) if isinstance(getattr(g, f.name), float)
                and not math.isfinite(getattr(g, f.name))]
    checks = [
        (not infinite, f"{', '.join(infinite)}: give a finite number"),
        (model.attn != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None,
         "--attn flash_attention_2 needs the flash-attn package (pip install flash-attn), or use --attn sdpa"),
        (not bad_forms, f"--eval-stages: unknown or repeated forms {bad_forms}; use judge, choice, open, each once"),
        (model.model != "", "--model: give the folder of a Qwen2.5-VL / Qwen2-VL checkpoint"),
        (all(g >= 2 for g in groups), "--group-size must be >= 2: a group of one has no relative advantage"),
        (all(s >= 1 for s in steps), "--stage-steps must be >= 1"),
        (rl.prompts_per_step >= 1 and rl.micro_batch >= 1, "--prompts-per-step and --micro-batch must be >= 1"),
        (rl.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (rl.temperature > 0, "--temperature must be > 0"),
        (rl.lr > 0 and rl.beta >= 0 and rl.clip_eps > 0, "need lr > 0, beta >= 0, clip-eps > 0"),
        (rl.mu >= 1 and rl.warmup >= 0 and rl.grad_clip > 0, "need mu >= 1, warmup >= 0, grad-clip > 0"),
        (min(run.ckpt_every, run.keep, run.max_bad_steps) >= 1, "need ckpt-every, keep, max-bad-steps >= 1"),
        (min(p2.phase2_prompts, p2.phase2_samples, p2.phase2_epochs, p2.phase2_batch) >= 1 and p2.phase2_lr > 0,
         "phase-2 sizes must be >= 1 and its lr > 0"),
        (0 <= rl.choice_partial <= 1, "--choice-partial must be between 0 and 1 (the right letters' reward)"),
        (p2.phase2_bar <= 2, "--phase2-bar: at most 2, the largest reward (accuracy 1 + format 1)"),
        (cfg.data.image_size >= 28 and cfg.data.image_size % 28 == 0, "--image-size must be a multiple of 28"),
        (cfg.data.pool_size >= 1 and cfg.data.eval_n >= 0, "need pool-size >= 1, eval-n >= 0 (0: no evaluation)"),
        (cfg.data.eval_n == 0 or cfg.data.eval_n >= 3 or cfg.data.eval_data,
         f"--eval-n {cfg.data.eval_n}: at least 3 (a third of the rows for each task), or 0 for no evaluation"),
        (not p2.phase2 or p2.phase2_data or p2.phase2_prompts <= cfg.data.pool_size,
         f"--phase2-prompts {p2.phase2_prompts}: more than the --pool-size {cfg.data.pool_size} rows that phase 2 "
         "asks its prompts from (the pool's last rows); lower it or raise --pool-size"),
        (model.max_pixels >= 1, "--max-pixels must be >= 1"),
        (run.threads >= 0 and run.sample_every >= 0, "need threads >= 0 (0: torch's default), sample-every >= 0"),
        (run.threads <= (os.cpu_count() or 1), f"--threads {run.threads}: this machine has {os.cpu_count()} cores"),
        (model.model in ("tiny", "small", ModelConfig.model) or os.path.isdir(model.model),
         f"--model {model.model!r} is neither 'tiny' nor a folder"),
        (not model.cuda_graphs or (model.device != "cpu" and torch.cuda.is_available()),
         "--cuda-graphs needs a GPU (drop it on a CPU)"),
        (not model.cuda_graphs or model.shard != "fsdp",
         "--cuda-graphs cannot replay a sharded model's steps: use --shard none or optimizer, or drop --cuda-graphs"),
        (rl.prompts_per_step % W == 0,
         f"--prompts-per-step {rl.prompts_per_step} must split evenly over {W} processes"),
    ]
    runtime.require(checks)
    return stages, groups, steps

def as_dict(cfg):
    return dataclasses.asdict(cfg)
