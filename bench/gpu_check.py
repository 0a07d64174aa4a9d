"""The GPU check: what a lent H200 can verify, in one command and under 8 minutes.

    python bench/gpu_check.py [--device cuda|cpu] [--tiny] [--out bench/results/gpu_check.json]

That machine has torch, transformers and onnxruntime, no network, no vLLM and no model weights
(only the working tree travels there), so the check builds its own model: a randomly
initialised Llama of SmolLM2-135M's shape (training/model.py's `smollm2-135m` preset with
SmolLM2's rope_theta and context length), saved as a Hugging Face dir in a temp dir with a
word-level tokenizer (token i is the word "i"; prompts go in as token ids). `--tiny` swaps in a
4-layer model of width 64 and a few tokens, so the CPU run takes seconds (tests/test_gpu_check.py).

Sections, each timed, each under its own time budget, each in its own try/except (a failure is
recorded with its message and the next section runs; the JSON is rewritten after every one):
- engine: the built-in engine (serving/engine, `EngineConfig.device`) against transformers'
  `LlamaForCausalLM.generate(do_sample=False)` on the same prompts, per dtype (bf16 and fp32;
  fp32 only with `--tiny` on the CPU): generated tokens/s of each after a warm-up, and greedy
  agreement (tokens equal position by position, the matched prefix before the first
  difference, sequences fully identical). Then an untimed parity pass: the engine's
  log-probability of each generated token against transformers' logits, where the two still
  agree, and the reference's top-1 margin (how close to a tie greedy decoding ran).
- fp8: training/fp8.py (row-wise e4m3, `torch._scaled_mm`, the Llama 3 recipe) on the model:
  next-token top-1 agreement, max/mean |logit difference| and KL against bf16 on a few hundred
  prompts, each converted MLP's relative output error on the same input, and the speed of a
  forward pass at a compute-bound batch, bf16 vs fp8 (plus one MLP alone). Where the device
  cannot run `_scaled_mm` the section is "skipped" with the reason.
- training: a few bf16 steps of training/trainer.py's `Trainer` on synthetic token batches:
  model FLOPs utilisation, 6 * params * tokens/s over a bf16 matmul peak measured in the same
  run (and, on CUDA, over the H200's nominal dense 989 TFLOP/s).

Random weights make the accuracy figures weaker than a trained model's: a random tied-embedding
model soon repeats one token with a wide margin, so greedy agreement there mostly tests the
first tokens; the fp32 log-probability parity is the sensitive check (docs/scale.md).

Exit status 0 when no section failed (skipped is not failed), 1 otherwise; the JSON is written
either way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the lent machine runs the working tree, not an installed package
    sys.path.insert(0, str(ROOT))

H200_DENSE_BF16 = 989e12  # FLOP/s, the datasheet's dense bf16 figure (H100 SXM's too)
PAD = 0  # left padding for transformers' batched generate; masked out, never attended


@dataclass
class Plan:
    """The sizes of one run: the full check on a GPU, or `--tiny` for a CPU smoke test."""

    model: dict  # ModelConfig overrides of the smollm2-135m preset
    prompts: int  # engine section: requests
    prompt_len: tuple[int, int]  # their lengths, uniform in this range
    new_tokens: int
    passes: int  # timed passes per system (the best is reported)
    fp8_prompts: int  # fp8 accuracy: prompts of fp8_prompt_len tokens
    fp8_prompt_len: int
    fp8_speed_batch: tuple[int, int]  # (sequences, tokens) of the timed forward
    fp8_reps: int
    train_batch: int
    train_seq: int
    train_steps: int
    peak_size: int  # square matmul for the measured peak
    budgets: dict = field(default_factory=dict)  # seconds per section


FULL = Plan(model={"rope_theta": 100000.0, "max_seq_len": 8192},  # SmolLM2-135M's config.json
            prompts=32, prompt_len=(16, 128), new_tokens=64, passes=2,
            fp8_prompts=512, fp8_prompt_len=64, fp8_speed_batch=(64, 512), fp8_reps=10,
            train_batch=16, train_seq=1024, train_steps=24, peak_size=8192,
            budgets={"engine": 200.0, "fp8": 90.0, "training": 100.0})
TINY = Plan(model={"vocab_size": 512, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128,
                   "max_seq_len": 256},
            prompts=8, prompt_len=(4, 24), new_tokens=16, passes=1,
            fp8_prompts=64, fp8_prompt_len=16, fp8_speed_batch=(4, 32), fp8_reps=3,
            train_batch=4, train_seq=32, train_steps=6, peak_size=512,
            budgets={"engine": 60.0, "fp8": 30.0, "training": 30.0})


class Skipped(Exception):
    """A section (or part of one) that cannot run here; the message says why."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """fn()'s result and its wall time, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids 3..vocab-1 (0-2 are pad/bos/eos), lengths uniform in lo..hi."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# --- the figures (pure functions) -------------------------------------------------------------


def greedy_agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """How far two greedy decodings of the same prompts agree.

    Returns:
        token_agreement: share of positions with the same token (position by position);
        prefix_agreement: mean share of each sequence before its first difference (after a
            difference the two continue from different contexts, so later positions say less);
        sequences_identical: share of sequences equal token for token.
    """
    same = total = 0
    prefix, identical = [], 0
    for a, b in zip(ours, ref, strict=True):
        n = max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        total += n
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(first / n if n else 1.0)
        identical += a == b
    return {"token_agreement": same / total if total else 1.0,
            "prefix_agreement": sum(prefix) / len(prefix) if prefix else 1.0,
            "sequences_identical": identical / len(ours) if ours else 1.0}


def logit_comparison(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Two (N, vocab) logit tables of the same positions: top-1 agreement, |difference|, KL."""
    ref, other = ref.float(), other.float()
    diff = (other - ref).abs()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"positions": ref.shape[0],
            "top1_agreement": (ref.argmax(-1) == other.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "mean_abs_logit": ref.abs().mean().item(),
            "relative_error": ((other - ref).norm() / ref.norm().clamp(min=1e-30)).item(),
            "mean_kl": kl.mean().item(), "max_kl": kl.max().item()}


def top1_margins(logits: torch.Tensor) -> dict:
    """Gap between the best and second-best logit, per position: how near greedy runs to a tie."""
    top = logits.float().topk(2, dim=-1).values
    gap = top[:, 0] - top[:, 1]
    return {"mean": gap.mean().item(), "median": gap.median().item(), "min": gap.min().item(),
            "share_below_0.01": (gap < 0.01).float().mean().item()}


def mfu(n_params: int, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: 6 FLOPs per parameter per trained token over the peak."""
    return 6.0 * n_params * tokens_per_s / peak


# --- environment --------------------------------------------------------------------------------


def device_report(device: torch.device) -> dict:
    from cascade.cpu import cpu_report

    out = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "cpu": cpu_report(), "torch_threads": torch.get_num_threads()}
    for name in ("transformers", "onnxruntime", "tokenizers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # recorded, not fatal: a missing one fails only where it is needed
            out[name] = f"unavailable: {type(exc).__name__}: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on `device` (the CPU one is training.trainer.matmul_peak)."""
    if device.type == "cpu":
        from training.trainer import matmul_peak as cpu_peak

        return cpu_peak("bf16" if dtype == torch.bfloat16 else "fp32", size=size)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    _, wall = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / wall


# --- setup: the model dir --------------------------------------------------------------------


def word_tokenizer(vocab: int):
    """Token i is the word "i" (tests/test_engine.py's id_tokenizer): the engine needs a
    tokenizer.json to decode, and prompts go in as ids, so no trained vocabulary is needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


EMBED_STD = 0.1


def lively_init(model: torch.nn.Module, embed_std: float = EMBED_STD) -> None:
    """Random weights under which the next token depends on the context.

    With the trainer's init (N(0, 0.02), residual outputs scaled down by depth) the blocks
    barely touch the residual stream, and a random tied-embedding model repeats one token
    forever (measured: 1 distinct token in 16 for every prompt), so greedy agreement would test
    nothing. Here every Linear is N(0, 1/fan_in), so each block changes the stream as much as
    its input, and the (tied) embeddings are N(0, 0.1^2), which spreads the logits enough that
    greedy decoding is rarely near a tie (median top-1 margin ~0.3 at SmolLM2's shape; 4-7
    distinct tokens in 16)."""
    head = model.embed_tokens.weight
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is not head:
                module.weight.normal_(0.0, module.in_features ** -0.5)
        head.normal_(0.0, embed_std)


def build_model_dir(out: Path, plan: Plan) -> dict:
    from training.hf_io import save_hf
    from training.model import build_model

    torch.manual_seed(0)
    model = build_model("smollm2-135m", **plan.model)
    lively_init(model)
    out.mkdir(parents=True, exist_ok=True)
    word_tokenizer(model.cfg.vocab_size).save(str(out / "tokenizer.json"))
    save_hf(model, out, tokenizer_json=out / "tokenizer.json")  # fp32 on disk; each section picks its dtype
    return {"model_dir": str(out), "config": model.cfg.to_dict(), "params": model.num_params(non_embedding=False),
            "weights": f"random, seed 0: every Linear N(0, 1/fan_in), tied embeddings N(0, {EMBED_STD}^2) "
                       "(lively_init: the trainer's init makes a random model repeat one token)"}


# --- (a) the engine against transformers --------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_engine(model_dir: Path, device: torch.device, dtype: str, prompts: list[list[int]], new_tokens: int,
               passes: int) -> tuple[dict, list[list[int]], object]:
    from serving.engine.config import EngineConfig
    from serving.engine.engine import LLMEngine
    from serving.engine.sampling import SamplingParams

    block = 16
    blocks = sum(-(-(len(p) + new_tokens) // block) for p in prompts) + 16  # all at once, no preemption
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig.default(
        dtype=dtype, device=device.type if device.index is None else str(device), num_blocks=blocks,
        block_size=block, max_num_seqs=max(64, len(prompts))))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    walls, tokens = [], None
    for _ in range(passes):
        engine.kv.reset_prefix_cache()  # every pass computes every prompt
        outs, wall = timed(lambda: engine.generate(prompts, params), device)
        walls.append(wall)
        tokens = [o.token_ids for o in outs]
    generated = sum(len(t) for t in tokens)
    stats = engine.stats()
    return ({"wall_s": min(walls), "passes_s": walls, "tokens_per_s": generated / min(walls),
             "attention": stats["attention"], "steps": stats["steps"]}, tokens, engine)


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from training.task import left_pad as pad_left

    ids, mask = pad_left(prompts, PAD)
    return ids.to(device), mask.to(device)


def load_transformers(model_dir: Path, device: torch.device, dtype: torch.dtype):
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # Exactly new_tokens each, as the engine's ignore_eos: no eos stop (min_new_tokens would
    # instead mask eos out of the argmax, which the engine does not do).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = PAD
    return hf


def hf_generate(hf, ids, mask, new_tokens: int, **extra):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                       **extra)


def run_transformers(hf, device: torch.device, prompts: list[list[int]], new_tokens: int,
                     passes: int) -> tuple[dict, list[list[int]]]:
    """One left-padded batch of all the prompts, as a `generate` user would send it."""
    ids, mask = left_pad(prompts, device)
    with torch.inference_mode():
        hf_generate(hf, ids[:2], mask[:2], 4)  # warm-up
        walls = []
        for _ in range(passes):
            out, wall = timed(lambda: hf_generate(hf, ids, mask, new_tokens), device)
            walls.append(wall)
    tokens = out[:, ids.shape[1]:].tolist()
    generated = sum(len(t) for t in tokens)
    return {"wall_s": min(walls), "passes_s": walls, "tokens_per_s": generated / min(walls),
            "batch": f"{len(prompts)} prompts in one left-padded batch"}, tokens


def parity_pass(engine, hf, device: torch.device, prompts: list[list[int]], new_tokens: int) -> dict:
    """Untimed: the engine's log-probability of each token it generates against transformers'
    log-softmax at the same position, over the positions where the two decodings still agree."""
    from serving.engine.sampling import SamplingParams

    engine.kv.reset_prefix_cache()
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True, logprobs=1))
    ids, mask = left_pad(prompts, device)
    with torch.inference_mode():
        res = hf_generate(hf, ids, mask, new_tokens, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(res.logits, dim=1).float()  # (B, new_tokens, vocab)
    ref_tokens = res.sequences[:, ids.shape[1]:].tolist()
    ours = torch.tensor([o.token_ids for o in outs], device=logits.device)  # (B, new_tokens)
    ref_lp = torch.log_softmax(logits, -1).gather(-1, ours[..., None]).squeeze(-1).tolist()
    diffs = []
    for o, ref_row, lp_row in zip(outs, ref_tokens, ref_lp):
        for token, (logprob, _), ref_token, lp in zip(o.token_ids, o.logprobs, ref_row, lp_row):
            if token != ref_token:
                break  # from here on the two condition on different tokens
            diffs.append(abs(logprob - lp))
    margins = top1_margins(logits.reshape(-1, logits.shape[-1]))
    return {"positions_compared": len(diffs),
            "max_abs_logprob_diff": max(diffs) if diffs else None,
            "mean_abs_logprob_diff": sum(diffs) / len(diffs) if diffs else None,
            "reference_top1_margin": margins}


def check_engine(ctx: dict, plan: Plan, device: torch.device, budget: Budget) -> dict:
    model_dir = Path(ctx["model_dir"])
    vocab = ctx["config"]["vocab_size"]
    prompts = random_prompts(plan.prompts, *plan.prompt_len, vocab, seed=1)
    dtypes = ["fp32"] if device.type == "cpu" and plan is TINY else ["bf16", "fp32"]
    out = {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "new_tokens_per_prompt": plan.new_tokens,
           "greedy": True, "tokens_per_s_counts": "generated tokens only, prompt tokens not counted", "runs": {}}
    for name in dtypes:
        if budget.left() < 0.25 * plan.budgets["engine"]:
            out["runs"][name] = {"status": "skipped", "reason": f"section budget: {budget.left():.0f} s left"}
            continue
        run: dict = {}
        out["runs"][name] = run
        t0 = time.perf_counter()
        run["engine"], ours, engine = run_engine(model_dir, device, name, prompts, plan.new_tokens, plan.passes)
        hf = load_transformers(model_dir, device, DTYPES[name])
        run["transformers"], ref = run_transformers(hf, device, prompts, plan.new_tokens, plan.passes)
        run["engine_speedup"] = run["engine"]["tokens_per_s"] / run["transformers"]["tokens_per_s"]
        run["agreement"] = greedy_agreement(ours, ref)
        # A random model soon repeats itself: few distinct tokens mean agreement tests little.
        run["reference_distinct_tokens_per_sequence"] = sum(len(set(t)) for t in ref) / len(ref)
        if budget.left() > 0.1 * plan.budgets["engine"]:
            run["parity"] = parity_pass(engine, hf, device, prompts, plan.new_tokens)
        else:
            run["parity"] = {"status": "skipped", "reason": f"section budget: {budget.left():.0f} s left"}
        run["elapsed_s"] = time.perf_counter() - t0
        del engine, hf
        free(device)
    return out


# --- (b) FP8 -----------------------------------------------------------------------------------


def probe_scaled_mm(device: torch.device, dtype: torch.dtype) -> None:
    """Raise Skipped with the reason when this device/torch cannot run fp8.Fp8Linear."""
    from training.fp8 import Fp8Linear

    try:
        lin = torch.nn.Linear(64, 32, bias=False).to(device=device, dtype=dtype)
        y = Fp8Linear(lin).to(device)(torch.randn(16, 64, device=device, dtype=dtype))
        sync(device)
    except Exception as exc:  # NotImplementedError/RuntimeError, worded differently per torch build
        raise Skipped(f"torch._scaled_mm on {device} ({dtype}): {type(exc).__name__}: {exc}") from None
    if not torch.isfinite(y).all():
        raise Skipped(f"torch._scaled_mm on {device} ({dtype}) returned non-finite values")


def mlp_errors(ref_model, fp8_model, tokens: torch.Tensor) -> dict:
    """Each converted MLP's relative output error on the bf16 model's own input to it (so
    upstream differences do not count twice)."""
    from training.fp8 import Fp8Linear

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    converted = [i for i, layer in enumerate(fp8_model.layers) if isinstance(layer.mlp.up_proj, Fp8Linear)]
    hooks = [ref_model.layers[i].mlp.register_forward_hook(
        lambda mod, args, y, i=i: seen.__setitem__(i, (args[0].detach(), y.detach()))) for i in converted]
    try:
        ref_model(tokens)
    finally:
        for h in hooks:
            h.remove()
    errs = {}
    for i in converted:
        x, y = seen[i]
        y8 = fp8_model.layers[i].mlp(x)
        errs[i] = ((y8.float() - y.float()).norm() / y.float().norm().clamp(min=1e-30)).item()
    vals = list(errs.values())
    return {"layers": len(vals), "mean": sum(vals) / len(vals) if vals else None, "max": max(vals) if vals else None}


def forward_time(model, batch: torch.Tensor, last: torch.Tensor, reps: int, device: torch.device) -> float:
    """Median wall time of one forward pass (logits at the last position, as the classifier reads)."""
    for _ in range(2):
        model(batch, logits_at=last)
    times = [timed(lambda: model(batch, logits_at=last), device)[1] for _ in range(reps)]
    return statistics.median(times)


def check_fp8(ctx: dict, plan: Plan, device: torch.device, budget: Budget) -> dict:
    from training.fp8 import convert_to_fp8
    from training.hf_io import load_hf

    dtype = torch.bfloat16  # FP8 is measured against bf16, the dtype it replaces in serving
    probe_scaled_mm(device, dtype)
    model = load_hf(ctx["model_dir"], dtype=dtype).to(device).eval()
    fp8 = copy.deepcopy(model)
    converted = convert_to_fp8(fp8)
    cfg = model.cfg
    out: dict = {"reference": "bf16", "recipe": "training/fp8.py: row-wise e4m3 weights, dynamic row-wise "
                 "activations (amax cap 1200), MLPs only, first and last blocks kept",
                 "converted_linears": len(converted)}
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, cfg.vocab_size, (plan.fp8_prompts, plan.fp8_prompt_len), generator=g)
    last_ref, last_fp8, all_ref, all_fp8 = [], [], [], []
    chunk = 128
    with torch.inference_mode():
        for a in range(0, len(prompts), chunk):
            batch = prompts[a:a + chunk].to(device)
            ref, q = model(batch), fp8(batch)  # (B, T, vocab)
            last_ref.append(ref[:, -1])
            last_fp8.append(q[:, -1])
            all_ref.append(ref[:, ::8].reshape(-1, ref.shape[-1]))  # every 8th position
            all_fp8.append(q[:, ::8].reshape(-1, q.shape[-1]))
        out["accuracy"] = {"prompts": len(prompts), "prompt_tokens": plan.fp8_prompt_len,
                           "next_token_last_position": logit_comparison(torch.cat(last_ref), torch.cat(last_fp8)),
                           "every_8th_position": logit_comparison(torch.cat(all_ref), torch.cat(all_fp8)),
                           "mlp_relative_error": mlp_errors(model, fp8, prompts[:16].to(device))}
        del last_ref, last_fp8, all_ref, all_fp8, ref, q
        if budget.left() < 0.2 * plan.budgets["fp8"]:
            out["speed"] = {"status": "skipped", "reason": f"section budget: {budget.left():.0f} s left"}
            return out
        B, T = plan.fp8_speed_batch
        batch = torch.randint(3, cfg.vocab_size, (B, T), device=device)
        last = torch.zeros(B, T, dtype=torch.bool, device=device)
        last[:, -1] = True
        t_bf16 = forward_time(model, batch, last, plan.fp8_reps, device)
        t_fp8 = forward_time(fp8, batch, last, plan.fp8_reps, device)
        flops = 2 * model.num_params(non_embedding=True) * B * T  # the body's matmuls; attention and head aside
        speed = {"batch": [B, T], "tokens": B * T, "bf16_s": t_bf16, "fp8_s": t_fp8, "speedup": t_bf16 / t_fp8,
                 "bf16_body_tflops": flops / t_bf16 / 1e12, "fp8_body_tflops": flops / t_fp8 / 1e12}
        # One converted MLP alone, on the same rows: the GEMMs fp8 speeds up, with its
        # dynamic activation quantisation (amax, scale, cast) counted in.
        i = len(model.layers) // 2
        x = torch.randn(B * T, cfg.dim, device=device, dtype=dtype)
        for key, mlp in (("mlp_bf16_s", model.layers[i].mlp), ("mlp_fp8_s", fp8.layers[i].mlp)):
            for _ in range(2):
                mlp(x)
            speed[key] = statistics.median(timed(lambda m=mlp: m(x), device)[1] for _ in range(plan.fp8_reps))
        speed["mlp_speedup"] = speed["mlp_bf16_s"] / speed["mlp_fp8_s"]
        out["speed"] = speed
    del model, fp8
    free(device)
    return out


# --- (c) a bf16 training step's MFU --------------------------------------------------------------


def check_training(ctx: dict, plan: Plan, device: torch.device, budget: Budget, work: Path) -> dict:
    from training.model import ModelConfig, Transformer
    from training.trainer import IGNORE, Hooks, Sequence, TrainConfig, Trainer

    peak = matmul_peak(device, torch.bfloat16, plan.peak_size)
    peak_dtype = "bf16"
    if device.type == "cpu":  # without AVX512-BF16/AMX, bf16 matmuls are emulated, slower than fp32, and
        # autocast leaves some ops in fp32: the ceiling is the better of the two (an AVX2 CPU gave MFU 1.02
        # against the bf16 figure alone)
        fp32 = matmul_peak(device, torch.float32, plan.peak_size)
        peak, peak_dtype = max((peak, "bf16"), (fp32, "fp32"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**ctx["config"])).to(device)  # fp32 master weights, bf16 autocast
    n_params = model.num_params(non_embedding=False)  # the tied embedding once: it is the head's matmul too
    cfg = model.cfg
    rng = random.Random(3)
    data = []
    for _ in range(plan.train_batch * plan.train_steps):
        ids = [rng.randrange(3, cfg.vocab_size) for _ in range(plan.train_seq)]
        data.append(Sequence(ids, ids[1:] + [IGNORE]))
    tcfg = TrainConfig(lr=3e-4, warmup_steps=2, max_steps=plan.train_steps, batch_size=plan.train_batch,
                       precision="bf16", log_every=1, bucket_batches=1, peak_flops=peak)
    trainer = Trainer(model, data, tcfg, work / "train", Hooks(), pad_id=PAD, n_params=n_params, device=device)
    result = trainer.fit(progress=False)
    steps = [e for e in result.log if "tokens_per_s" in e]
    warm = min(2, len(steps) - 1)  # the first steps pay for allocation and kernel selection
    tps = statistics.median(e["tokens_per_s"] for e in steps[warm:])
    attn_flops = 12 * cfg.n_layers * cfg.dim * plan.train_seq  # PaLM's attention term per token
    out = {"steps": len(steps), "timed_steps": len(steps) - warm, "batch": [plan.train_batch, plan.train_seq],
           "precision": "bf16 autocast, fp32 master weights, AdamW", "n_params": n_params,
           "attention": "SDPA with the padding mask the Trainer passes (no flash kernel with a mask)",
           "tokens_per_s": tps, "step_s": plan.train_batch * plan.train_seq / tps,
           "losses": [round(x, 4) for x in result.losses],
           "measured_peak_flops": peak, "peak_matmul": f"{plan.peak_size}^3 {peak_dtype} on {device.type}"
           + (" (the better of bf16 and fp32)" if device.type == "cpu" else ""),
           "mfu": mfu(n_params, tps, peak),
           "mfu_with_attention": (6 * n_params + attn_flops) * tps / peak,
           "formula": "mfu = 6 * n_params * tokens_per_s / peak (median over the timed steps)"}
    if device.type == "cuda":
        out["nominal_peak_flops"] = H200_DENSE_BF16
        out["mfu_nominal"] = mfu(n_params, tps, H200_DENSE_BF16)
    if not 0 < out["mfu"] <= 1:  # kept, figures and all, but flagged: the peak or the timing is off
        out["warning"] = f"MFU {out['mfu']:.3g} is outside (0, 1]: the measured peak or the step timing is off"
    del model, trainer
    free(device)
    return out


# --- the run ---------------------------------------------------------------------------------------


def run_section(report: dict, name: str, fn, budget: Budget, out_path: Path, device: torch.device) -> None:
    """fn(budget)'s figures under report["sections"][name], with its status and time; the JSON is
    rewritten at once, so a run cut short keeps what it finished."""
    t0 = time.perf_counter()
    try:
        entry = {"status": "ok", **fn(budget)}
    except Skipped as exc:
        entry = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # recorded, and the next section runs
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    entry["elapsed_s"] = time.perf_counter() - t0
    with contextlib.suppress(Exception):  # what a failed section left on the GPU
        free(device)
    report["sections"][name] = entry
    write_json(out_path, report)
    print(f"{name}: {entry['status']} in {entry['elapsed_s']:.1f} s"
          + (f" ({entry.get('reason') or entry.get('error')})" if entry["status"] != "ok" else ""), flush=True)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model and a few tokens (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = ap.parse_args(argv)
    plan = TINY if args.tiny else FULL
    t_start = time.perf_counter()
    given = argv if argv is not None else sys.argv[1:]
    report: dict = {"command": " ".join(["python", "bench/gpu_check.py", *given]),
                    "tiny": args.tiny, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "budgets_s": plan.budgets, "sections": {}}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report["error"] = "--device cuda: torch sees no CUDA device"
        report["sections"] = {n: {"status": "failed", "error": report["error"]} for n in ("engine", "fp8", "training")}
        write_json(args.out, report)
        print(report["error"], file=sys.stderr)
        return 1
    report["env"] = device_report(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        try:
            t0 = time.perf_counter()
            ctx = build_model_dir(work / "model", plan)
            report["model"] = {k: v for k, v in ctx.items() if k != "model_dir"}
            report["model"]["setup_s"] = time.perf_counter() - t0
        except Exception as exc:
            err = f"setup failed: {type(exc).__name__}: {exc}"
            report["sections"] = {n: {"status": "failed", "error": err} for n in ("engine", "fp8", "training")}
            report["traceback"] = traceback.format_exc()
            write_json(args.out, report)
            print(err, file=sys.stderr)
            return 1
        sections = {
            "engine": lambda b: check_engine(ctx, plan, device, b),
            "fp8": lambda b: check_fp8(ctx, plan, device, b),
            "training": lambda b: check_training(ctx, plan, device, b, work),
        }
        for name, fn in sections.items():
            run_section(report, name, fn, Budget(plan.budgets[name]), args.out, device)
    report["elapsed_s"] = time.perf_counter() - t_start
    write_json(args.out, report)
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    print(f"wrote {args.out} in {report['elapsed_s']:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
