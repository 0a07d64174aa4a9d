"""Student kinds side by side on a finished run: the distilled SmolLM2 slice against the
pre-trained MiniLM encoder (issue 16), same teacher, same data, one run.

    python bench/students.py --run runs/e2e-banking77                  # trains minilm-l6 beside it
    python bench/students.py --run runs/e2e-banking77 --epochs 4 --lr 1e-4

The run's own student (RUN/student, distil-smollm2 by `bench/e2e.py`) is measured as it is; each
other size is distilled from RUN/large into RUN/student-SIZE (kept; `--reuse` measures it again
without training), exported to ONNX and static int8 as `cascade export --int8` does. Per
student, on the test split: accuracy of the served int8 graph and of ONNX fp32, ECE after its
temperature, items/s of the int8 graph at batch 1 and 32 (onnxruntime, this machine's threads),
its achieved FLOP/s as a fraction of an fp32 matmul peak measured in the same run, the int8
file's size, non-embedding parameters, and training time. The teacher's test accuracy (its
cached label distributions) is the reference. Writes bench/results/students-DATASET.json with
the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def items_per_s(run, texts: list[str], batch: int, budget_s: float = 6.0) -> float:
    run(texts[:batch])  # warm-up: first-call allocations are not the steady state
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s and done < len(texts):
        run(texts[done:done + batch])
        done += batch
    return done / (time.perf_counter() - t0)


def measure_student(student_dir: Path, texts: list[str], gold_idx: np.ndarray, peak: float) -> dict:
    import torch
    from tokenizers import Tokenizer

    from training.export import encode, ort_session, softmax
    from training.student import student_config
    from training.temperature import expected_calibration_error

    max_len = student_config(json.loads((student_dir / "config.json").read_text())).max_seq_len
    temperature = json.loads((student_dir / "calibration.json").read_text())["temperature"]
    tok = Tokenizer.from_file(str(student_dir / "tokenizer.json"))
    ids, mask = encode(tok, texts, max_len)
    out = {}
    for name, file in (("onnx_fp32", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        sess = ort_session(student_dir / file)
        feeds = ({"input_ids": ids[i:i + 256], "attention_mask": mask[i:i + 256]} for i in range(0, len(ids), 256))
        logits = np.concatenate([sess.run(["logits"], f)[0] for f in feeds])
        probs = softmax(logits / temperature)
        out[name] = {"accuracy": float((probs.argmax(-1) == gold_idx).mean()),
                     "ece": expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(gold_idx))}
    sess = ort_session(student_dir / "model.int8.onnx")

    def run(batch: list[str]) -> None:
        i, m = encode(tok, batch, max_len)
        sess.run(["logits"], {"input_ids": i, "attention_mask": m})

    summary = json.loads((student_dir / "train_summary.json").read_text())
    tokens_per_text = float(mask.sum() / len(mask))
    speed = {f"batch{b}": items_per_s(run, texts[:1024], b) for b in (1, 32)}
    flops_per_item = 2 * summary["non_embedding_params"] * tokens_per_text  # forward, weights only
    return {
        "size": summary.get("size"), "non_embedding_params": summary["non_embedding_params"],
        "params": summary.get("params"), "train_wall_s": summary.get("wall_s"), "steps": summary.get("steps"),
        "val_accuracy": summary.get("val_accuracy"), "temperature": temperature, **out,
        "int8_items_per_s": speed,
        "int8_fraction_of_fp32_peak": {k: v * flops_per_item / peak for k, v in speed.items()},
        "int8_file_mb": (student_dir / "model.int8.onnx").stat().st_size / 2**20,
        "tokens_per_text": tokens_per_text,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished bench/e2e.py run (RUN/large, RUN/student, RUN/data)")
    ap.add_argument("--sizes", default="minilm-l6", help="comma-separated sizes to distil beside the run's student")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-4, help="a pre-trained encoder fine-tunes at a small lr")
    ap.add_argument("--max-steps", type=int, help="cap (smoke runs of this script)")
    ap.add_argument("--reuse", action="store_true", help="measure RUN/student-SIZE as it is")
    ap.add_argument("--out", help="default bench/results/students-DATASET.json")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not (run / "large" / "cascade.json").exists() or not (run / "student" / "model.int8.onnx").exists():
        print(f"students: {run} is not a finished e2e run (needs large/ and an exported student/)", file=sys.stderr)
        return 2
    from cascade.cpu import cpu_report
    from cascade.data import load_split
    from training.distill import teacher_distributions, train_student
    from training.flywheel import export_student
    from training.recipes import STUDENT
    from training.trainer import TrainConfig, matmul_peak

    data = run / "data"
    test = load_split(data, "test")
    texts = [ex.text for ex in test]
    labels = json.loads((run / "large" / "cascade.json").read_text())["labels"]
    gold_idx = np.array([labels.index(ex.label) for ex in test])
    teacher_probs, _ = teacher_distributions(run / "large", texts)
    peak = matmul_peak("fp32", repeats=5)
    result = {"run": str(run), "cpu": cpu_report(), "fp32_matmul_peak_flops": peak, "n_test": len(texts),
              "teacher_test_accuracy": float((teacher_probs.argmax(-1).numpy() == gold_idx).mean()),
              "students": {"distil-smollm2 (the run's)": measure_student(run / "student", texts, gold_idx, peak)}}
    for size in [s for s in args.sizes.split(",") if s]:
        out = run / f"student-{size}"
        if not (args.reuse and (out / "model.int8.onnx").exists()):
            cfg = TrainConfig(**{**STUDENT, "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps})
            train_student(data, run / "large", out, size=size, cfg=cfg)
            export_student(out, data)
        result["students"][size] = measure_student(out, texts, gold_idx, peak)
    for s in result["students"].values():
        s["int8_accuracy_over_teacher"] = s["onnx_int8"]["accuracy"] / result["teacher_test_accuracy"]
    name = Path(run).name.removeprefix("e2e-")
    out_file = Path(args.out) if args.out else ROOT / "bench" / "results" / f"students-{name}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{run}: teacher test accuracy {result['teacher_test_accuracy']:.4f}; CPU {result['cpu']['class']} "
          f"({' '.join(result['cpu']['flags'])}), fp32 peak {peak / 1e9:.0f} GFLOP/s")
    for name_, s in result["students"].items():
        print(f"  {name_:>28}: int8 test {s['onnx_int8']['accuracy']:.4f} ({s['int8_accuracy_over_teacher']:.3f} "
              f"of the teacher), ECE {s['onnx_int8']['ece']:.4f}, {s['int8_items_per_s']['batch1']:.0f} / "
              f"{s['int8_items_per_s']['batch32']:.0f} items/s at batch 1 / 32, {s['int8_file_mb']:.1f} MB, "
              f"{s['non_embedding_params']:,} non-embedding params")
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
