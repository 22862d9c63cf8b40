"""The generate stage: after train, the trained policy and the reference answer the same
prompts, side by side, and a reward model (``generate.reward_model``) may judge them.

The prompts (``prompts.py``) are written first as ``prompts.parquet``; then each output
shard, ``samples-NNNNN.parquet``, holds the completions for ``generate.prompts_per_shard``
prompts, committed whole as score commits its shards, so a killed run resumes shard by
shard. Actors (the run's warm actors, cluster/workers.py, as score's) each load the policy (train's export,
which the runner hands on as ``model.path``), the reference (``model.reference_path``, the
sft export, or the model train started from) and the reward model once, then answer a shard
a call: the policy's completions, the reference's, and the rewards of both and of the
dataset's chosen answer. Stats: lengths, mean rewards, and win rates with 95% Wilson
intervals over prompts.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.core import placement
from pipeline.core.config import PipelineConfig, config_from_dict, for_workers, to_dict
from pipeline.core.devices import require_gpu
from pipeline.core.modeling import DTYPES
from pipeline.core.models import local_dir
from pipeline.core.phases import STARTUP, WORK, PhaseClock
from pipeline.core.config import ConfigError
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint
from pipeline.core.storage import Loc
from pipeline.core.tokenizer import end_of_turn_id, load_tokenizer

from .engines import HFEngine, VLLMEngine, resolve_engine, shard_seed
from .judge import RewardModel, win_rate
from .prompts import PROMPTS_FILE, eval_prompts, file_prompts

STAGE_VERSION = 1
SIDES = ("policy", "reference")

SAMPLE_SCHEMA = pa.schema([
    ("prompt_index", pa.int64()),
    ("pair_id", pa.string()),
    ("sample", pa.int32()),
    ("prompt", pa.string()),
    ("policy", pa.string()),
    ("reference", pa.string()),
    ("chosen", pa.string()),  # the dataset's answers, where the prompt came from the eval split
    ("rejected", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("policy_tokens", pa.int32()),
    ("reference_tokens", pa.int32()),
    ("chosen_tokens", pa.int32()),
    ("policy_ids", pa.list_(pa.int32())),
    ("reference_ids", pa.list_(pa.int32())),
    ("policy_reward", pa.float32()),  # null without generate.reward_model
    ("reference_reward", pa.float32()),
    ("chosen_reward", pa.float32()),
])


def shard_name(k: int) -> str:
    return f"samples-{k:05d}.parquet"


class ShardGenerator:
    """A generation actor: both models (and the reward model) loaded once; a call answers
    whole shards."""

    def __init__(self, cfg_dict: dict):
        self.cfg = config_from_dict(cfg_dict, handed_on=True)
        g = self.cfg.generate
        require_gpu(g.num_gpus_per_actor > 0, "generate.num_gpus_per_actor")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(g.cpu_threads)
        self.tokenizer = load_tokenizer(self.cfg)
        eot = end_of_turn_id(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.stop_ids = sorted({i for i in (eos, eot) if i is not None})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        paths = {"policy": self.cfg.model.path, "reference": self.cfg.reference_path}
        self.engine = resolve_engine(g.engine, g.num_gpus_per_actor)
        if self.engine == "vllm":
            self.engines = {side: VLLMEngine(local_dir(p, self.cfg.model), self.cfg.model, g, self.stop_ids)
                            for side, p in paths.items()}
        else:
            self.engines = {side: HFEngine(p, self.cfg.model, self.device, pad, self.stop_ids)
                            for side, p in paths.items()}
        self.judge = None if g.reward_model is None else RewardModel(
            local_dir(g.reward_model, self.cfg.model), DTYPES[self.cfg.model.dtype], self.device,
            self.cfg.model.trust_remote_code)
        self.ready_at = time.time()  # the stage's start-up ends when its first actor gets here
        placement.settle()

    def answer(self, prompts: pa.Table, shard: int) -> pa.Table:
        g = self.cfg.generate
        rows = prompts.to_pylist()
        ids = [r["prompt_ids"] for r in rows]
        done = {side: engine.generate(ids, g, shard_seed(g.seed, shard, i))
                for i, (side, engine) in enumerate(self.engines.items())}
        text = lambda t: None if t is None else self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        out = []
        for i, r in enumerate(rows):
            prompt_markup = self.tokenizer.decode(r["prompt_ids"])  # what a reward model reads: the chat markup kept
            chosen_reward = None
            if self.judge is not None and r["chosen_ids"] is not None:
                chosen_reward = self.judge.score(prompt_markup, self.tokenizer.decode(r["chosen_ids"]))
            for s in range(g.num_samples):
                sample = {side: done[side][i][s] for side in SIDES}
                rewards = {side: self.judge.score(prompt_markup, self.tokenizer.decode(sample[side]))
                           if self.judge is not None else None for side in SIDES}
                out.append({
                    "prompt_index": r["prompt_index"], "pair_id": r["pair_id"], "sample": s,
                    "prompt": text(r["prompt_ids"]), "policy": text(sample["policy"]),
                    "reference": text(sample["reference"]), "chosen": text(r["chosen_ids"]),
                    "rejected": text(r["rejected_ids"]), "prompt_tokens": len(r["prompt_ids"]),
                    "policy_tokens": len(sample["policy"]), "reference_tokens": len(sample["reference"]),
                    "chosen_tokens": None if r["chosen_ids"] is None else len(r["chosen_ids"]),
                    "policy_ids": sample["policy"], "reference_ids": sample["reference"],
                    "policy_reward": rewards["policy"], "reference_reward": rewards["reference"],
                    "chosen_reward": chosen_reward,
                })
        return pa.Table.from_pylist(out, schema=SAMPLE_SCHEMA)

    def generate_shard(self, prompts_path: str, shard: int, dst: str) -> dict:
        per = self.cfg.generate.prompts_per_shard
        with Loc(prompts_path).open_input() as f:
            prompts = pq.read_table(f)
        Loc(dst).write_parquet(self.answer(prompts.slice(shard * per, per), shard))
        return {"name": Loc(dst).name, "engine": self.engine, "ready_at": self.ready_at, **placement.here()}

    def generate_item(self, item: dict) -> dict:
        return self.generate_shard(item["prompts"], item["shard"], item["dst"])


# ----------------------------------------------------------------------------- the driver side


def settings(cfg: PipelineConfig) -> dict:
    """The generate settings that change what it writes (not where or how fast it runs)."""
    g = cfg.generate
    return {k: getattr(g, k) for k in ("num_prompts", "max_new_tokens", "temperature", "top_p", "num_samples",
                                       "seed", "engine", "tensor_parallel_size", "prompts_per_shard")}


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, fingerprints: dict) -> dict:
    """The trained policy (train's fingerprint, which chains the tokenized prompts), the
    reference (sft's fingerprint, or its files), the prompts file's and the reward model's
    content, the settings."""
    g = cfg.generate
    return {
        "version": STAGE_VERSION,
        "policy": fingerprints["train"],
        "reference": {"sft": fingerprints["sft"]} if "sft" in fingerprints else
        hash_checkpoint(local_dir(cfg.reference_path, cfg.model), "model", cache),
        "prompts_file": None if g.prompts_file is None else Loc(g.prompts_file).sha256(),
        "reward_model": None if g.reward_model is None else  # its tokenizer too: it reads text
        {kind: hash_checkpoint(local_dir(g.reward_model, cfg.model), kind, cache) for kind in ("model", "tokenizer")},
        "dtype": cfg.model.dtype,
        "settings": settings(cfg),
    }


def preflight(cfg: PipelineConfig, use_ray: bool) -> None:
    """Before any stage runs: the prompts file and the reward model are there, and the
    reward model gives one score."""
    g = cfg.generate
    if g.prompts_file is not None and not Loc(g.prompts_file).is_file():
        raise ConfigError(f"generate.prompts_file: {g.prompts_file}: no such file")
    if g.reward_model is not None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(local_dir(g.reward_model, cfg.model),
                                                trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"generate.reward_model: {g.reward_model}: {str(e).splitlines()[0]}") from None
        if config.num_labels != 1:
            raise ConfigError(f"generate.reward_model: {g.reward_model} has {config.num_labels} labels; a reward "
                              "model gives one score (a sequence-classification model with num_labels 1)")


def write_prompts(cfg: PipelineConfig, tokenized: Loc, out: Loc) -> pa.Table:
    """The prompts, written once: a resumed attempt reads the ones its shards were cut from."""
    path = out / PROMPTS_FILE
    if path.is_file():
        with path.open_input() as f:
            return pq.read_table(f)
    g = cfg.generate
    table = file_prompts(g.prompts_file, load_tokenizer(cfg)) if g.prompts_file else \
        eval_prompts(tokenized, g.num_prompts, g.seed)
    path.write_parquet(table)
    return table


def _todo(out: Loc, prompts: pa.Table, per: int) -> list[dict]:
    todo = []
    for k in range(-(-prompts.num_rows // per)):
        dst = out / shard_name(k)
        expected = min(per, prompts.num_rows - k * per)
        if not _complete(dst, expected):
            todo.append({"prompts": str(out / PROMPTS_FILE), "shard": k, "dst": str(dst)})
    return todo


def _complete(path: Loc, prompts: int) -> bool:
    """A committed shard: its Parquet footer reads, with a row for each of its prompts' samples."""
    try:
        if not path.is_file():
            return False
        with path.open_input() as f:
            table = pq.read_table(f, columns=["prompt_index"])
        return len(set(table.column(0).to_pylist())) == prompts
    except (OSError, pa.ArrowInvalid):
        return False


def _stats(out: Loc, prompts: pa.Table, done: list[dict], per: int, show: int) -> tuple[list[ShardInfo], dict]:
    for leftover in out.iterdir():  # half-written files of actors that were killed
        if ".tmp-" in leftover.name:
            leftover.unlink()
    files = [out / shard_name(k) for k in range(-(-prompts.num_rows // per))]
    tables = []
    for f in files:
        with f.open_input() as fh:
            tables.append(pq.read_table(fh))
    t = pa.concat_tables(tables)
    shards = [ShardInfo.of(out / PROMPTS_FILE, prompts.num_rows)] + [ShardInfo.of(f, tb.num_rows)
                                                                     for f, tb in zip(files, tables)]
    mean = lambda name: None if t.column(name).null_count == t.num_rows else float(pc.mean(t.column(name)).as_py())  # noqa: E731
    stats = {"rows": t.num_rows, "tokens": int(pc.sum(t.column("policy_tokens")).as_py())
             + int(pc.sum(t.column("reference_tokens")).as_py()),
             "prompts": prompts.num_rows, "samples": t.num_rows, "show": show,
             "mean_tokens": {side: mean(f"{side}_tokens") for side in ("policy", "reference", "chosen")},
             "engines": sorted({d["engine"] for d in done}),  # this attempt's (auto resolves on the actors)
             "workers": placement.by_node(done, "shards"),
             "shards_from_earlier_attempts": len(files) - len(done)}
    if t.column("policy_reward").null_count < t.num_rows:
        stats["mean_reward"] = {side: mean(f"{side}_reward") for side in ("policy", "reference", "chosen")}
        stats["win_rates"] = win_rates(t)
    return shards, stats


def win_rates(t: pa.Table) -> dict:
    """The policy against the reference, and against the dataset's chosen answer (prompts
    that have one), over prompts; rewards as (prompts, samples) arrays."""
    order = np.lexsort((t.column("sample").to_numpy(), t.column("prompt_index").to_numpy()))
    samples = int(pc.max(t.column("sample")).as_py()) + 1
    grid = lambda name: t.column(name).to_numpy(zero_copy_only=False)[order].astype(np.float64).reshape(-1, samples)  # noqa: E731
    policy, reference, chosen = grid("policy_reward"), grid("reference_reward"), grid("chosen_reward")
    out = {"policy_vs_reference": win_rate(policy, reference)}
    has = ~np.isnan(chosen[:, 0])
    if has.any():
        out["policy_vs_chosen"] = win_rate(policy[has], chosen[has][:, :1])
    return out


def run(cfg: PipelineConfig, tokenized: Loc, out: Loc, use_ray: bool, clock: PhaseClock | None = None):
    out = Loc(out)
    prompts = write_prompts(cfg, Loc(tokenized), out)
    g = cfg.generate
    todo = _todo(out, prompts, g.prompts_per_shard)
    done = []
    if todo and use_ray:
        from cluster import workers

        with workers.current() as pool:  # the actors commit the shards; this drives them and says where
            done = pool.map("generate", ShardGenerator, {"cfg_dict": for_workers(cfg)}, "generate_item", todo,
                            actors=g.actors, num_cpus=g.num_cpus_per_actor, num_gpus=g.num_gpus_per_actor)
    elif todo:
        generator = ShardGenerator(to_dict(cfg))
        done = [generator.generate_item(item) for item in todo]
    if clock is not None and done:  # start-up: until the first actor had its models loaded
        clock.end(STARTUP, min(d["ready_at"] for d in done))
        clock.end(WORK)
    return _stats(out, prompts, done, g.prompts_per_shard, g.show)


def summary_lines(stats: dict) -> list[str]:
    lengths = stats["mean_tokens"]
    line = (f"generate: {stats['prompts']} prompts x {stats['samples'] // stats['prompts']} samples; mean completion "
            f"tokens policy {lengths['policy']:.1f}, reference {lengths['reference']:.1f}")
    rates = stats.get("win_rates")
    if not rates:
        return [line + " (no reward model: generate.reward_model)"]
    vs = [f"{name.split('_vs_')[1]} {r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
          for name, r in rates.items()]
    return [line, "generate: policy win rate against " + ", ".join(vs) + " (95% Wilson, ties half)"]
