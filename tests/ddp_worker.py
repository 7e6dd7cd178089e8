"""Run by tests/test_trainer.py under torchrun (2 processes, gloo) and alone: same global batch, same losses.

usage: ddp_worker.py OUT.json GLOBAL_BATCH OUTPUT_DIR [ddp|fsdp] [RESUME_CHECKPOINT]
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from fastalign.config import DPOConfig
from fastalign.data import DEFAULT_PREFERENCES, default_model_and_tokenizer, load_rows
from fastalign.trainer import DPOTrainer


def main(out_path, global_batch, output_dir, mode="ddp", resume=None):
    torch.set_num_threads(1)
    model, tok = default_model_and_tokenizer(seed=0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = DPOConfig(output_dir=output_dir, learning_rate=1e-3, beta=0.5, max_steps=4, logging_steps=1, save_steps=2,
                    per_device_train_batch_size=global_batch // world, max_length=96, max_prompt_length=64,
                    disable_tqdm=True, report_to="none", seed=3, fsdp=mode == "fsdp")
    trainer = DPOTrainer(model, tokenizer=tok, train_dataset=load_rows(DEFAULT_PREFERENCES, "train")[:40], config=cfg)
    history = trainer.train(resume_from_checkpoint=resume)
    final = trainer.save_model()
    if trainer.is_main:
        with open(out_path, "w") as f:
            json.dump({"world": trainer.world_size, "loss": [h["loss"] for h in history], "final": final}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
