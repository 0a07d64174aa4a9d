"""The C paged-attention kernel (serving/engine/paged_attention.c) against attention computed in
fp32 from the gathered K/V, and the engine with it against the engine with torch attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serving.engine import kernels
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling import SamplingParams
from tests.test_engine import id_tokenizer, prompts_of
from training.model import build_model

if not kernels.paged_attention_available():
    pytest.skip("no C compiler here to build the kernel", allow_module_level=True)


def paged_case(specs, H, K, D, bs, dtype, num_blocks=300, seed=0):
    """A pool of scattered blocks holding sequences given as (query rows, position of the first):
    every slot is NaN except those the sequences use, so a read of a stale slot shows."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.full((num_blocks, K, bs, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, seqs, row = [], [], 0
    for n, start in specs:
        ctx = start + n
        blocks = [free.pop() for _ in range(-(-ctx // bs))]
        for p in range(ctx):
            k_cache[blocks[p // bs], :, p % bs] = torch.randn(K, D, generator=g).to(dtype)
            v_cache[blocks[p // bs], :, p % bs] = torch.randn(K, D, generator=g).to(dtype)
        seqs.append([row, n, start, len(tables)])
        tables += blocks
        row += n
    q = torch.randn(row, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(seqs)


def reference(q, k_cache, v_cache, tables, seqs):
    """fp32 SDPA per sequence over its gathered context, GQA heads repeated."""
    H, (K, bs, D) = q.shape[1], k_cache.shape[1:]
    out = torch.empty(q.shape, dtype=torch.float32)
    for row, n, start, off in seqs.tolist():
        ctx = start + n
        blocks = tables[off:off + -(-ctx // bs)]
        k = k_cache[blocks].transpose(0, 1).reshape(K, -1, D)[:, :ctx].float().repeat_interleave(H // K, 0)
        v = v_cache[blocks].transpose(0, 1).reshape(K, -1, D)[:, :ctx].float().repeat_interleave(H // K, 0)
        mask = torch.arange(ctx)[None, :] <= (start + torch.arange(n))[:, None]
        o = F.scaled_dot_product_attention(q[row:row + n].float().transpose(0, 1), k, v, attn_mask=mask)
        out[row:row + n] = o.transpose(0, 1)
    return out


# decodes at block edges, a fresh prefill, prefill chunks after cached context, a 1-token prompt
SPECS = [(1, 37), (5, 0), (1, 0), (1, 15), (1, 16), (17, 15), (40, 3), (1, 200)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,K,D,bs", [
    (9, 3, 64, 16),  # SmolLM2's heads, the default block: the AVX512-BF16 path where the CPU has it
    (4, 2, 16, 4),  # the generic path
    (6, 6, 32, 5),  # no GQA, an odd block size
])
def test_kernel_equals_attention_over_the_gathered_context(H, K, D, bs, dtype, atol):
    case = paged_case(SPECS, H, K, D, bs, dtype)
    out = kernels.paged_attention(*case)
    assert out.dtype == dtype and torch.isfinite(out).all(), "a stale (NaN) slot was read"
    assert (out.float() - reference(*case)).abs().max() < atol


def test_kernel_writes_only_the_rows_it_is_given():
    q, k, v, tables, seqs = paged_case([(3, 4), (1, 9)], 4, 2, 16, 4, torch.float32)
    out = torch.full_like(q, 7.0)
    kernels.paged_attention(q, k, v, tables, seqs[1:], out=out)  # only the second sequence
    assert (out[:3] == 7.0).all() and not (out[3] == 7.0).any()


def test_kernel_rejects_what_it_cannot_read():
    q, k, v, tables, seqs = paged_case([(2, 3)], 4, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        kernels.paged_attention(q.bfloat16(), k, v, tables, seqs)
    with pytest.raises(ValueError, match="shapes"):
        kernels.paged_attention(q[..., :8], k, v, tables, seqs)
    with pytest.raises(ValueError, match="int64"):
        kernels.paged_attention(q, k, v, tables.int(), seqs)
    # indices that would read or write outside q, the tables or the pool: refused before C runs
    with pytest.raises(ValueError, match="outside the pool"):
        kernels.paged_attention(q, k, v, tables + k.shape[0], seqs)
    for field, value in ((0, 1), (1, 0), (2, -1), (3, 1)):
        bad = seqs.clone()
        bad[0, field] = value
        with pytest.raises(ValueError, match=r"seqs\[0\]"):
            kernels.paged_attention(q, k, v, tables, bad)


def test_loading_the_kernel_keeps_denormals_for_everyone_else():
    """Built with -ffast-math, a shared object sets flush-to-zero for the whole process when it
    loads; the kernel flushes only inside its own call."""
    kernels.load()
    tiny = np.float32(1e-38) * np.float32(0.01)
    assert tiny > 0 and float(torch.tensor([1e-38]) * 0.01) > 0


def test_no_compiler_falls_back_to_torch_or_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CASCADE_KERNEL_DIR", str(tmp_path / "kernels"))
    kernels.load.cache_clear()
    try:
        with pytest.raises(kernels.KernelUnavailable, match="no-such-cc"):
            kernels.load()
        model = build_model("debug").eval()
        auto = LLMEngine(model, id_tokenizer(), EngineConfig.default(dtype="fp32", num_blocks=64), eos_token_id=None)
        assert not auto.runner.attention_kernel and "attention stays in torch" in caplog.text
        with pytest.raises(kernels.KernelUnavailable):
            LLMEngine(model, id_tokenizer(), EngineConfig.default(dtype="fp32", num_blocks=64, attention="kernel"))
    finally:
        kernels.load.cache_clear()


def test_bf16_engine_with_the_kernel_matches_torch_attention():
    """A bf16 model with head_dim 64 and blocks of 16 (the kernel's fast path): label
    distributions, mixed short and long prompts behind a cached prefix, as torch's attention gives
    them, and the same greedy tokens."""
    torch.manual_seed(0)
    model = build_model("debug", dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256).eval().to(torch.bfloat16)
    make = lambda attention: LLMEngine(  # noqa: E731
        model, id_tokenizer(), EngineConfig.default(dtype="bf16", num_blocks=128, attention=attention),
        eos_token_id=None)
    with_kernel, with_torch = make("kernel"), make("torch")
    assert with_kernel.stats()["attention"] == "kernel" and with_torch.stats()["attention"] == "torch"
    shared = prompts_of([40], seed=7)[0]
    prompts = [shared + p for p in prompts_of([1, 5, 17, 90], seed=3)] + prompts_of([3, 70], seed=4)
    texts = [" ".join(map(str, p)) for p in prompts]
    labels = [str(i) for i in range(10, 60)]
    for engine in (with_kernel, with_torch):
        engine.generate([shared + [3]], SamplingParams(max_tokens=1))
    a, b = with_kernel.classify(texts, labels), with_torch.classify(texts, labels)
    assert sum(o.cached_tokens > 0 for o in a) == 4
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.choice_scores).log(), torch.tensor(y.choice_scores).log(), atol=0.05)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    same = [x.token_ids == y.token_ids for x, y in zip(with_kernel.generate(prompts, params),
                                                        with_torch.generate(prompts, params))]
    assert sum(same) >= len(same) - 1  # bf16: a near-tie may flip one token somewhere


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,K,D,bs", [(9, 3, 64, 16), (4, 2, 16, 4)])
def test_a_rows_output_does_not_depend_on_its_batch_mates(H, K, D, bs, dtype):
    """Bit for bit: a query row alone (a decode, or a prompt tail after the prefix cache) gets
    what it gets inside a long prefill chunk, and beside other sequences. The bf16 fast path
    used to finish few-row steps with another summation order."""
    start, n = 20, 48
    q, k, v, tables, seqs = paged_case([(n, start), (3, 7), (1, 90)], H, K, D, bs, dtype)
    together = kernels.paged_attention(q, k, v, tables, seqs)
    own = seqs[0].tolist()
    for r in range(n):
        alone = kernels.paged_attention(q[r:r + 1].contiguous(), k, v, tables,
                                        torch.tensor([[0, 1, start + r, own[3]]]))
        assert torch.equal(alone[0], together[r]), f"row {r}"
    for t in (2, 17):  # a chunk that starts mid-prompt (the rest of it cached)
        tail = kernels.paged_attention(q[t:n].contiguous(), k, v, tables, torch.tensor([[0, n - t, start + t, own[3]]]))
        assert torch.equal(tail, together[t:n])
