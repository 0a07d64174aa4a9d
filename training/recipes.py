"""One source of training defaults per model kind: the `cascade train large|student` flags,
the library functions, the quickstart and the benchmarks all start from these and say where
they deviate. Plain dicts of `TrainConfig` fields, torch-free, so the CLI can show them in
`--help` without importing torch.

    cfg = TrainConfig(**{**STUDENT, "epochs": 6})
"""

from __future__ import annotations

# Fine-tuning a pre-trained decoder (SmolLM2-135M) on a task: one epoch at a small lr is enough
# for the label token; longer overfits the few thousand texts of a task dataset.
LARGE = {"lr": 1e-4, "epochs": 1.0, "batch_size": 32, "grad_accum": 1, "warmup_steps": 30,
         "weight_decay": 0.1, "clip_norm": 1.0, "ckpt_every": 100, "keep_last": 2, "spike_factor": 3.0,
         "eval_every": 0, "precision": "auto", "seed": 0}

# Distilling a compact student: small models take a 10x larger lr and a few epochs.
STUDENT = {"lr": 1e-3, "epochs": 3.0, "batch_size": 64, "warmup_steps": 50, "ckpt_every": 200,
           "precision": "auto", "seed": 0}

# Fine-tuning a pre-trained encoder student (`--size minilm-l6`): its weights already know
# language, so a 10x smaller lr than a student trained from the teacher's slice.
PRETRAINED_STUDENT = {**STUDENT, "lr": 1e-4, "epochs": 4.0}

# Toy scale for smoke runs and tests (`cascade quickstart --smoke`).
SMOKE_LARGE = {"lr": 3e-3, "max_steps": 15, "batch_size": 16, "warmup_steps": 2}
SMOKE_STUDENT = {"lr": 1e-3, "max_steps": 15, "epochs": 6, "batch_size": 64, "warmup_steps": 5}
