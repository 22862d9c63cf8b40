"""Run by tests/test_zero3_memory.py in its own process (one ZeRO-3 rank, gloo): builds the
train stage's engine on MODEL (fp32), runs 3 optimizer steps of the log-prob pass over a
packed row (the completion tokens' NLL, through ``engine(row)``), and writes what DeepSpeed holds and what the steps computed.

Usage: python tests/zero3_master_probe.py MODEL fixed|unfixed OUT.json
("unfixed": cluster/zero3_master_weights.py not installed, as before the fix).
"""

import json
import sys

import torch

import cluster.zero3_master_weights as zero3_master_weights
from pipeline.core.config import ModelConfig, TrainConfig
from pipeline.training.engine import build_engine, init_distributed
from pipeline.training.forward import row_loss
from stages.sft.objective import SFTObjective

model, mode, out = sys.argv[1:4]
if mode == "unfixed":
    zero3_master_weights.install = lambda: None
init_distributed("gloo")
engine = build_engine(TrainConfig(zero_stage=3, learning_rate=1e-2, report_to=[]),
                      ModelConfig(path=model, dtype="float32"), 1, 3, SFTObjective(1024), torch.device("cpu"))
opt = engine.optimizer
params = {t.untyped_storage().data_ptr() for t in opt.fp16_partitioned_groups_flat}
copies = [t for t in opt.fp32_partitioned_groups_flat if t.untyped_storage().data_ptr() not in params]
vocab = engine.module.config.vocab_size
row = {"input_ids": [(7 * i) % vocab for i in range(64)], "position_ids": [i % 16 for i in range(64)],
       "seq_lens": [16] * 4, "prompt_lens": [4] * 4, "num_tokens": 64}
losses = []
for _ in range(3):
    loss = row_loss(engine, row).loss_sum / 48  # the completion tokens' NLL, through engine(row)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item().hex())
with open(out, "w") as f:
    json.dump({"master_copy_bytes": sum(t.numel() * t.element_size() for t in copies),
               "partition_bytes": sum(t.numel() * t.element_size() for t in opt.fp16_partitioned_groups_flat),
               "sub_groups": len(opt.fp16_partitioned_groups_flat), "losses": losses,
               "weights": [torch.sum(t.double()).item().hex() for t in opt.fp16_partitioned_groups_flat]}, f)
