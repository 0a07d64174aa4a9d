"""The large model's code against transformers' Llama: weights, RoPE and logits must agree."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llama import modeling_llama  # noqa: E402

from training.hf_io import CheckpointError, load_hf, save_hf  # noqa: E402
from training.model import SIZES, ModelConfig, apply_rope, build_model, rope_tables  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def test_gqa_shapes_and_kv_head_count():
    model = build_model("debug")
    cfg = model.cfg
    attn = model.layers[0].self_attn
    assert cfg.n_kv_heads < cfg.n_heads
    assert attn.q_proj.weight.shape == (cfg.n_heads * cfg.head_dim, cfg.dim)
    assert attn.k_proj.weight.shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    assert attn.v_proj.weight.shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    assert model(torch.randint(0, cfg.vocab_size, (3, 11))).shape == (3, 11, cfg.vocab_size)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_tied_embeddings_share_one_tensor():
    tied, untied = build_model("debug", tie_embeddings=True), build_model("debug", tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == 256 * 64


def test_named_sizes_match_smollm2_shape():
    cfg = SIZES["smollm2-135m"]
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.n_layers) == (9, 3, 576, 30)


def test_rope_matches_transformers():
    cfg = SIZES["debug"]
    hf_cfg = transformers.LlamaConfig(hidden_size=cfg.dim, num_attention_heads=cfg.n_heads,
                                      num_key_value_heads=cfg.n_kv_heads, rope_theta=50000.0,
                                      max_position_embeddings=64)
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    q = torch.randn(2, cfg.n_heads, 9, cfg.head_dim)
    k = torch.randn(2, cfg.n_kv_heads, 9, cfg.head_dim)
    pos = torch.arange(3, 12)
    hf_cos, hf_sin = rotary(q, pos[None])
    hq, hk = modeling_llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = rope_tables(cfg.head_dim, pos, 50000.0)
    assert torch.allclose(cos, hf_cos[0], atol=1e-6) and torch.allclose(sin, hf_sin[0], atol=1e-6)
    assert torch.allclose(apply_rope(q, cos, sin), hq, atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), hk, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_our_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    model = build_model("debug", tie_embeddings=tie, rope_theta=20000.0).eval()
    save_hf(model, tmp_path, cascade_meta={"task": "demo"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert json.loads((tmp_path / "cascade.json").read_text()) == {"task": "demo"}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 23))
    mask = torch.ones_like(tokens)
    mask[0, :6] = 0  # left padding, as batched prompts have
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4
        ours, theirs = model(tokens, attention_mask=mask), hf(tokens, attention_mask=mask).logits
        assert (ours - theirs)[mask.bool()].abs().max() <= 1e-4


def test_transformers_checkpoint_loads_in_ours_with_the_same_logits(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=12345.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    assert (model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.rope_theta) == (6, 2, 12345.0)
    tokens = torch.randint(0, 300, (3, 19))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_loading_a_bad_dir_names_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a Llama-family"):
        load_hf(tmp_path)
    save_hf(build_model("debug"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)
