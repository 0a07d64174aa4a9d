"""Fine-tune SmolLM2-135M on CLINC150 with `cascade train large`; report speed and accuracy.

    python bench/large_clinc150.py [--epochs 1] [--batch-size 32] [--limit-train N]

Writes bench/results/large-clinc150.json: test_accuracy_in_scope, test_accuracy, val_accuracy,
tokens_per_s, fraction_of_peak (of the matmul FLOP/s measured in the same run), epochs, wall_s,
params. The model dir is kept in runs/large-clinc150 for the student and serving benchmarks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cascade.data import load_split, prepare
from cascade.metrics import accuracy
from training.large import load_large, train_large
from training.task import label_distribution
from training.trainer import TrainConfig, matmul_peak

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--limit-train", type=int)
    ap.add_argument("--limit-test", type=int)
    ap.add_argument("--out", default=str(ROOT / "runs" / "large-clinc150"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    data = ROOT / "runs" / "data" / "clinc150"
    prepare("clinc150", ROOT.parent / "shared" / "data" / "clinc150", data)
    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, warmup_steps=30,
                      eval_every=0, ckpt_every=100, log_every=10)
    t0 = time.perf_counter()
    run = train_large(data, args.out, init="smollm2-135m", cfg=cfg, resume=args.resume,
                      limit_train=args.limit_train, eval_limit=3100)
    train_wall = time.perf_counter() - t0

    model, tokenizer, fmt = load_large(args.out)
    test = load_split(data, "test")[: args.limit_test]
    t1 = time.perf_counter()
    probs = label_distribution(model, tokenizer, fmt, [ex.text for ex in test], batch_size=64,
                               dtype=torch.bfloat16 if run.summary["precision"] == "bf16" else None)
    infer_s = time.perf_counter() - t1
    pred = [fmt.labels[i] for i in probs.argmax(-1).tolist()]
    gold = [ex.label for ex in test]
    in_scope = [i for i, g in enumerate(gold) if g != "oos"]
    log = [json.loads(line) for line in (Path(args.out) / "train_log.jsonl").read_text().splitlines()]
    speed = [e for e in log if "tokens_per_s" in e]
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized) fine-tuned, label-token head",
        "precision": run.summary["precision"],
        "epochs": args.epochs,
        "steps": run.summary["steps"],
        "batch_size": args.batch_size,
        "params": run.summary["params"],
        "params_with_embeddings": run.summary["params_with_embeddings"],
        "val_accuracy": run.summary["val_accuracy"],
        "test_accuracy": accuracy(gold, pred),
        "test_accuracy_in_scope": accuracy([gold[i] for i in in_scope], [pred[i] for i in in_scope]),
        "test_n": len(test),
        "tokens_per_s": sum(e["tokens_per_s"] for e in speed) / max(1, len(speed)),
        "model_flops_per_s": sum(e["model_flops_per_s"] for e in speed) / max(1, len(speed)),
        "matmul_peak_flops": matmul_peak(run.summary["precision"]),
        "wall_s": train_wall,
        "test_items_per_s": len(test) / infer_s,
        "per_epoch": [{"epoch": args.epochs, "val_accuracy": run.summary["val_accuracy"],
                       "test_accuracy_in_scope": accuracy([gold[i] for i in in_scope], [pred[i] for i in in_scope])}],
        "torch_threads": torch.get_num_threads(),
    }
    result["fraction_of_peak"] = result["model_flops_per_s"] / result["matmul_peak_flops"]
    out = ROOT / "bench" / "results" / "large-clinc150.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
