"""Students on CLINC150: distilled student vs the fine-tuned SmolLM2 teacher vs TF-IDF + LR.

    python bench/large_clinc150.py            # once: the teacher, in runs/large-clinc150
    python bench/students_clinc150.py [--size distil-smollm2] [--epochs 3]

One run measures accuracy, non-embedding parameters and ECE of teacher and student, fits the
TF-IDF + logistic-regression baseline (scikit-learn), exports the student to ONNX fp32 and int8,
and times items/s at batch 1 and 32 for PyTorch fp32 eager, ONNX fp32 and ONNX int8 on the same
texts, side by side. Writes bench/results/students-clinc150.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cascade.data import load_split, prepare
from cascade.metrics import accuracy
from training.distill import teacher_distributions, train_student
from training.export import encode, export_onnx, ort_session, quantize_int8, softmax
from training.student import load_student
from training.temperature import expected_calibration_error
from training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def items_per_s(run, texts: list[str], batch: int, budget_s: float = 8.0) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s and done < len(texts):
        run(texts[done:done + batch])
        done += batch
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "large-clinc150"))
    ap.add_argument("--size", default="distil-smollm2")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, help="default: 3e-4 for distil-smollm2, 1e-3 otherwise")
    ap.add_argument("--out", default=str(ROOT / "runs" / "student-clinc150"))
    ap.add_argument("--reuse", action="store_true", help="keep a student already trained in --out")
    args = ap.parse_args()
    teacher = Path(args.teacher)
    if not (teacher / "cascade.json").exists():
        raise SystemExit(f"{teacher}: no teacher; run bench/large_clinc150.py first")
    data = ROOT / "runs" / "data" / "clinc150"
    prepare("clinc150", ROOT.parent / "shared" / "data" / "clinc150", data)
    test = load_split(data, "test")
    texts, gold = [ex.text for ex in test], [ex.label for ex in test]
    labels = json.loads((teacher / "cascade.json").read_text())["labels"]
    gold_idx = torch.tensor([labels.index(g) for g in gold])

    t0 = time.perf_counter()
    summary_file = Path(args.out) / "train_summary.json"
    if args.reuse and summary_file.exists():
        run = type("Run", (), {"summary": json.loads(summary_file.read_text())})()
    else:
        run = train_student(data, teacher, args.out, size=args.size, from_teacher=args.size == "distil-smollm2",
                            cfg=TrainConfig(lr=args.lr or (1e-3 if args.size != "distil-smollm2" else 3e-4),
                                            epochs=args.epochs,
                                            batch_size=64, warmup_steps=50, ckpt_every=200))
    train_s = run.summary.get("wall_s") if args.reuse else time.perf_counter() - t0
    export = export_onnx(args.out, [ex.text for ex in load_split(data, "val")][:256])
    int8 = quantize_int8(args.out, [ex.text for ex in load_split(data, "val")],
                         calibration=[ex.text for ex in load_split(data, "train")])

    # accuracy and ECE on test: teacher (cached label distributions), student fp32 / int8
    teacher_probs, _ = teacher_distributions(teacher, texts)
    student = load_student(args.out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.out) / "tokenizer.json"))
    temperature = json.loads((Path(args.out) / "calibration.json").read_text())["temperature"]
    ids, mask = encode(tok, texts, student.cfg.max_seq_len)
    fp32_sess, int8_sess = ort_session(Path(args.out) / "model.onnx"), ort_session(Path(args.out) / "model.int8.onnx")

    def onnx_logits(sess, i, m):
        return sess.run(["logits"], {"input_ids": i, "attention_mask": m})[0]

    s_logits = np.concatenate([onnx_logits(fp32_sess, ids[i:i + 256], mask[i:i + 256])
                               for i in range(0, len(ids), 256)])
    q_logits = np.concatenate([onnx_logits(int8_sess, ids[i:i + 256], mask[i:i + 256])
                               for i in range(0, len(ids), 256)])
    s_probs = torch.from_numpy(softmax(s_logits / temperature))
    q_probs = torch.from_numpy(softmax(q_logits / temperature))
    teacher_acc = accuracy(gold, [labels[i] for i in teacher_probs.argmax(-1).tolist()])
    student_acc = accuracy(gold, [labels[i] for i in s_probs.argmax(-1).tolist()])
    int8_acc = accuracy(gold, [labels[i] for i in q_probs.argmax(-1).tolist()])

    # TF-IDF + logistic regression, fitted here on the same train split
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = load_split(data, "train")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    clf = LogisticRegression(C=10.0, max_iter=2000)
    clf.fit(vec.fit_transform([ex.text for ex in train]), [ex.label for ex in train])
    tfidf_acc = accuracy(gold, list(clf.predict(vec.transform(texts))))

    # throughput, same texts, batch 1 and 32
    sample = texts[:2048]
    torch.set_num_threads(torch.get_num_threads())

    def torch_run(batch):
        i, m = encode(tok, batch, student.cfg.max_seq_len)
        with torch.no_grad():
            student(torch.from_numpy(i), torch.from_numpy(m))

    def ort_run(sess):
        def run(batch):
            i, m = encode(tok, batch, student.cfg.max_seq_len)
            onnx_logits(sess, i, m)
        return run

    speed = {name: {f"batch{b}": items_per_s(fn, sample, b) for b in (1, 32)}
             for name, fn in (("torch_fp32", torch_run), ("onnx_fp32", ort_run(fp32_sess)),
                              ("onnx_int8", ort_run(int8_sess)))}
    teacher_meta = json.loads((teacher / "train_summary.json").read_text())
    in_scope = [i for i, g in enumerate(gold) if g != "oos"]
    result = {
        "teacher": {"accuracy": teacher_acc, "non_embedding_params": teacher_meta["params"],
                    "ece": expected_calibration_error(teacher_probs, gold_idx)},
        "student": {"size": args.size, "accuracy": student_acc,
                    "non_embedding_params": run.summary["non_embedding_params"],
                    "params": run.summary["params"], "ece": expected_calibration_error(s_probs, gold_idx),
                    "ece_uncalibrated": expected_calibration_error(torch.from_numpy(softmax(s_logits)), gold_idx),
                    "temperature": temperature, "train_s": train_s, "val_accuracy": run.summary["val_accuracy"],
                    "in_scope_accuracy": accuracy([gold[i] for i in in_scope],
                                                  [labels[j] for j in s_probs[in_scope].argmax(-1).tolist()])},
        "student_over_teacher_accuracy": student_acc / teacher_acc,
        "student_over_teacher_params": run.summary["non_embedding_params"] / teacher_meta["params"],
        "tfidf_accuracy": tfidf_acc,
        "int8_accuracy": int8_acc,
        "int8_accuracy_drop": student_acc - int8_acc,
        "int8_top1_agreement_val": int8["top1_agreement"],
        "int8_top1_agreement_val_all_int8": int8["agreement_all_int8"],
        "int8_kept_fp32": int8["kept_fp32"],
        "export_parity_max_abs_diff": export["parity_max_abs_diff"],
        "items_per_s": speed,
        "onnx_int8_over_torch": {k: speed["onnx_int8"][k] / speed["torch_fp32"][k] for k in ("batch1", "batch32")},
        "test_n": len(texts),
        "torch_threads": torch.get_num_threads(),
    }
    result["config"] = {"epochs": args.epochs, "lr": args.lr, "size": args.size}
    out = ROOT / "bench" / "results" / "students-clinc150.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
