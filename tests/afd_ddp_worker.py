"""Run by tests/test_afd.py under torchrun (2 processes, gloo) and alone: AfDRewardTrainer, same global batch,
same losses. usage: afd_ddp_worker.py OUT.json GLOBAL_BATCH OUTPUT_DIR"""
import json
import os
import sys

import torch
import torch.distributed as dist

from fastalign.data import default_model_and_tokenizer
from fastalign.trainers.afd_reward import AfDRewardConfig, AfDRewardTrainer


def main(out_path, global_batch, output_dir):
    torch.set_num_threads(1)
    model, tok = default_model_and_tokenizer("reward", seed=0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = [{"prompt": f"{c}{k}:", "answer": "ab" * (1 + k % 3) if k % 2 else "zy" * (1 + k % 4), "label": k % 2}
            for k, c in enumerate("abcdefghijklmnopqrst")]
    cfg = AfDRewardConfig(output_dir=output_dir, learning_rate=1e-3, max_steps=3, logging_steps=1,
                          per_device_train_batch_size=global_batch // world, max_length=32, max_prompt_length=8,
                          disable_tqdm=True, report_to="none", seed=3)
    trainer = AfDRewardTrainer(model, tokenizer=tok, train_dataset=rows, config=cfg)
    history = trainer.train()
    if trainer.is_main:
        with open(out_path, "w") as f:
            json.dump({"world": trainer.world_size, "loss": [h["loss"] for h in history]}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
