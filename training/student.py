"""Students: compact transformer classifiers (and taggers) over the teacher's tokenizer.

An encoder made of the large model's own blocks (RMSNorm, RoPE attention, SwiGLU from
`training/model.py`) run bidirectionally with a padding mask, mean-pooled over real tokens, and
a linear label head. Optionally initialised from the teacher, DistilBERT style: its embeddings
and an evenly spaced subset of its layers (which needs the student's width to equal the
teacher's). A tagging student (`StudentTagger`, for extraction tasks) adds a per-token BIO tag
head on the same encoder (`cascade/tagging.py` has the tags).

A pre-trained student (`EncoderStudent`, size `minilm-l6`) is instead a BERT encoder from
transformers (`BertModel`) with the weights of all-MiniLM-L6-v2 (`cascade models import
minilm-l6`), its own WordPiece tokenizer, the same mean pool over real tokens and a new linear
label head. It is the one kind whose tokenizer is not the teacher's: the teacher's labels are
cached by text, so distillation is the same. `StudentConfig.arch` says which kind a dir holds
("cascade", the default, absent from older dirs, or "bert").

Shapes: B batch, T tokens, C width, L labels, K tags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from training.model import Block, ModelConfig, RMSNorm, Transformer, rope_tables


@dataclass
class StudentConfig:
    vocab_size: int
    n_labels: int
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 688
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_tags: int = 0  # > 0: a tagging student (BIO tags per token beside the label head)
    arch: str = "cascade"  # "cascade": our blocks (StudentClassifier); "bert": EncoderStudent
    # arch "bert": the pre-trained encoder's BERT config fields (its config.json, as imported);
    # the fields above override their BERT names (dim -> hidden_size, ...) so one source is read.
    encoder: dict | None = None

    def __post_init__(self):
        if self.arch not in STUDENT_ARCHS:
            raise ValueError(f"StudentConfig.arch {self.arch!r}: expected one of {', '.join(STUDENT_ARCHS)}")
        if self.arch == "bert" and (not self.encoder or self.n_tags):
            raise ValueError("StudentConfig.arch 'bert' needs `encoder` (its BERT config) and n_tags 0: "
                             "extraction students are the cascade kind")

    def bert_config(self):
        """transformers' BertConfig of an arch-"bert" student: `encoder` with our fields on top.
        Eager attention: its additive padding mask is plain tensor ops, for the ONNX exporter too."""
        from transformers import BertConfig

        cfg = BertConfig(**{**self.encoder, "vocab_size": self.vocab_size, "hidden_size": self.dim,
                            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                            "intermediate_size": self.hidden_dim, "layer_norm_eps": self.norm_eps,
                            "pad_token_id": 0})
        cfg._attn_implementation = "eager"
        return cfg

    def block_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_heads, hidden_dim=self.hidden_dim, max_seq_len=self.max_seq_len,
                           rope_theta=self.rope_theta, norm_eps=self.norm_eps)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["n_tags"]:  # a classifier's config reads as it did before taggers existed
            del d["n_tags"]
        if d["arch"] == "cascade":  # ... and as it did before pre-trained encoders
            del d["arch"], d["encoder"]
        return d


STUDENT_ARCHS = ("cascade", "bert")


# Width/depth per named size; vocab and labels come from the teacher and the task.
STUDENT_SIZES: dict[str, dict] = {
    "debug": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "small": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=688),
    # the teacher's width (SmolLM2-135M), 2 of its 30 layers (7.5% of its non-embedding params)
    "distil-smollm2": dict(dim=576, n_layers=2, n_heads=9, hidden_dim=1536, rope_theta=100000.0),
}

# Pre-trained students: size -> the known model (training/importer.py) whose encoder and
# tokenizer they start from. Kept apart from STUDENT_SIZES, which `--size auto` chooses among.
PRETRAINED_STUDENTS: dict[str, str] = {"minilm-l6": "minilm-l6"}

# Every name `cascade train student --size` takes (besides "auto").
STUDENT_SIZE_NAMES = (*STUDENT_SIZES, *PRETRAINED_STUDENTS)


class StudentClassifier(nn.Module):
    """forward(tokens (B, T), attention_mask (B, T)) -> label logits (B, L)."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        block_cfg = cfg.block_config()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(block_cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.n_labels)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states (B, T, C); padded positions hold values nothing reads."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, torch.arange(T, device=tokens.device),
                               self.cfg.rope_theta)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every token sees every real token
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def pool(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.bool().unsqueeze(-1).to(x.dtype)  # mean over real tokens only
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.encode(tokens, attention_mask), attention_mask))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n


class StudentTagger(StudentClassifier):
    """forward(tokens (B, T), attention_mask (B, T)) -> (label logits (B, L), tag logits (B, T, K)).

    The classifier's encoder and label head, plus a linear BIO tag head on every token's hidden
    state (tag logits at padded positions mean nothing). An extraction-only task has one label,
    "", whose head is never trained."""

    def __init__(self, cfg: StudentConfig):
        if cfg.n_tags < 1:
            raise ValueError("a tagging student needs n_tags >= 1")
        super().__init__(cfg)
        self.tag_head = nn.Linear(cfg.dim, cfg.n_tags)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encode(tokens, attention_mask)
        return self.head(self.pool(x, attention_mask)), self.tag_head(x)


class EncoderStudent(nn.Module):
    """forward(tokens (B, T), attention_mask (B, T)) -> label logits (B, L), over a BERT encoder.

    transformers' `BertModel` (no pooler: the [CLS] dense+tanh head is not used), mean-pooled
    over real tokens like `StudentClassifier` (sentence-transformers pools all-MiniLM the same
    way) and a linear label head. token_type_ids are all zeros, made here from `tokens`: a
    student reads one segment, and the ONNX graph keeps the two inputs every student has."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        from transformers import BertModel

        self.cfg = cfg
        self.bert = BertModel(cfg.bert_config(), add_pooling_layer=False)
        self.head = nn.Linear(cfg.dim, cfg.n_labels)

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, C); padded positions hold values nothing reads."""
        return self.bert(input_ids=tokens, attention_mask=attention_mask,
                         token_type_ids=torch.zeros_like(tokens)).last_hidden_state

    pool = StudentClassifier.pool

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.encode(tokens, attention_mask), attention_mask))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; `non_embedding` leaves out the three lookup tables (word, position, segment)."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        e = self.bert.embeddings
        return n - sum(t.weight.numel() for t in (e.word_embeddings, e.position_embeddings, e.token_type_embeddings))


def make_student(cfg: StudentConfig) -> nn.Module:
    if cfg.arch == "bert":
        return EncoderStudent(cfg)
    return StudentTagger(cfg) if cfg.n_tags else StudentClassifier(cfg)


def check_student_size(size: str, from_teacher: bool = False, tagging: bool = False) -> None:
    """Refuse what a size cannot do, before any teacher labelling: an unknown name,
    `--from-teacher` (or a tagging task) with a pre-trained student."""
    if size != "auto" and size not in STUDENT_SIZE_NAMES:
        raise ValueError(f"--size {size!r}: known student sizes are {', '.join(STUDENT_SIZE_NAMES)} (or auto)")
    if size in PRETRAINED_STUDENTS and from_teacher:
        raise ValueError(f"--from-teacher copies the teacher's layers into a cascade student; {size!r} starts "
                         "from its own pre-trained weights (and tokenizer): drop --from-teacher")
    if size in PRETRAINED_STUDENTS and tagging:
        raise ValueError(f"--size {size!r}: a tagging student cannot be {size!r}: extraction students are the "
                         "cascade kind (--size debug | small | distil-smollm2)")


def pretrained_dir(size: str) -> Path:
    """The imported encoder of a pre-trained size (`$CASCADE_HOME/models/NAME`, imported once)."""
    from training.importer import imported_dir

    return imported_dir(PRETRAINED_STUDENTS[size])


def student_tokenizer_file(size: str, teacher_dir: Path | None) -> Path | None:
    """The tokenizer.json a student of `size` reads with: a pre-trained size's own, else the
    teacher's (its ids line up for `init_from_teacher`); None without a teacher (the caller
    trains a BPE of the task's texts)."""
    if size in PRETRAINED_STUDENTS:
        return pretrained_dir(size) / "tokenizer.json"
    return Path(teacher_dir) / "tokenizer.json" if teacher_dir is not None else None


def pretrained_student(size: str, n_labels: int, max_len: int) -> EncoderStudent:
    """An `EncoderStudent` with the pre-trained encoder's weights and a fresh label head."""
    import json

    from safetensors.torch import load_file

    d = pretrained_dir(size)
    raw = json.loads((d / "config.json").read_text())
    if raw.get("model_type") != "bert":
        raise ValueError(f"{d / 'config.json'}: model_type {raw.get('model_type')!r}, expected 'bert'")
    if max_len > raw["max_position_embeddings"]:
        raise ValueError(f"--max-len {max_len}: {size} has {raw['max_position_embeddings']} positions")
    drop = {"architectures", "model_type", "transformers_version", "_name_or_path", "gradient_checkpointing",
            "use_cache", "torch_dtype", "dtype"}
    cfg = StudentConfig(vocab_size=raw["vocab_size"], n_labels=n_labels, dim=raw["hidden_size"],
                        n_layers=raw["num_hidden_layers"], n_heads=raw["num_attention_heads"],
                        hidden_dim=raw["intermediate_size"], max_seq_len=max_len, norm_eps=raw["layer_norm_eps"],
                        arch="bert", encoder={k: v for k, v in raw.items() if k not in drop})
    model = EncoderStudent(cfg)
    # position_ids is a buffer older transformers saved; the pooler is a head we do not use
    state = {k: v for k, v in load_file(str(d / "model.safetensors")).items()
             if k != "embeddings.position_ids" and not k.startswith("pooler.")}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d / 'model.safetensors'}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def build_student(size: str, vocab_size: int, n_labels: int, **overrides) -> StudentClassifier:
    """A named size; `n_tags=K` in `overrides` builds a `StudentTagger`."""
    if size not in STUDENT_SIZES:
        raise ValueError(f"unknown student size {size!r}; known: {', '.join(STUDENT_SIZES)}")
    return make_student(StudentConfig(vocab_size=vocab_size, n_labels=n_labels,
                                      **{**STUDENT_SIZES[size], **overrides}))


@torch.no_grad()
def init_from_teacher(student: StudentClassifier, teacher: Transformer) -> list[int]:
    """Copy the teacher's embeddings and evenly spaced layers; returns the teacher layers used."""
    if student.cfg.dim != teacher.cfg.dim or student.cfg.hidden_dim != teacher.cfg.hidden_dim:
        raise ValueError(f"student width {student.cfg.dim}/{student.cfg.hidden_dim} differs from the teacher's "
                         f"{teacher.cfg.dim}/{teacher.cfg.hidden_dim}; pick a size with the teacher's width")
    if teacher.cfg.n_kv_heads != teacher.cfg.n_heads and student.cfg.n_heads != teacher.cfg.n_heads:
        raise ValueError("student heads must equal the teacher's query heads")
    n_t, n_s = teacher.cfg.n_layers, student.cfg.n_layers
    picks = [round(i * (n_t - 1) / max(1, n_s - 1)) for i in range(n_s)]
    rows = min(student.cfg.vocab_size, teacher.cfg.vocab_size)
    student.embed_tokens.weight[:rows] = teacher.embed_tokens.weight[:rows]
    for s_layer, t_index in zip(student.layers, picks):
        t_layer = teacher.layers[t_index]
        t_attn, s_attn = t_layer.self_attn, s_layer.self_attn
        s_attn.q_proj.weight.copy_(t_attn.q_proj.weight)
        s_attn.o_proj.weight.copy_(t_attn.o_proj.weight)
        # GQA teacher -> MHA student: repeat each K/V head for the query heads it served
        group = teacher.cfg.n_heads // teacher.cfg.n_kv_heads
        hd = teacher.cfg.head_dim
        for name in ("k_proj", "v_proj"):
            w = getattr(t_attn, name).weight.view(teacher.cfg.n_kv_heads, hd, -1)
            getattr(s_attn, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(-1, w.shape[-1]))
        s_layer.mlp.load_state_dict(t_layer.mlp.state_dict())
        s_layer.input_layernorm.load_state_dict(t_layer.input_layernorm.state_dict())
        s_layer.post_attention_layernorm.load_state_dict(t_layer.post_attention_layernorm.state_dict())
    student.norm.load_state_dict(teacher.norm.state_dict())
    return picks


def student_hf_config(cfg: StudentConfig, labels: list[str], temperature: float = 1.0,
                      tagging: dict | None = None) -> dict:
    """config.json of a student dir: what transformers' AutoConfig, optimum and a hand-written
    onnxruntime loop read (labels, input length, temperature), plus our config under `cascade`.

    `model_type` must be one transformers knows for AutoConfig to load the file at all; the
    blocks are Llama's (the fields below describe them exactly), but the model is not a causal
    LM — it attends both ways, mean-pools and has a label head — so `architectures` names ours and
    the weights are meant for `load_student`/ONNX, not for `LlamaFor*`. transformers 5 drops
    generation-named keys (`max_length`, `temperature`) from a loaded config, hence their copy
    under `cascade`. A tagging student's `tagging` ({"task", "fields", "tags"}) goes under
    `cascade` and its tags into `id2tag` (tag id -> "O" / "B-name" / "I-name")."""
    if cfg.arch == "bert":
        return _bert_student_hf_config(cfg, labels, temperature)
    out = {
        "architectures": ["CascadeStudentTagger" if cfg.n_tags else "CascadeStudentClassifier"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "intermediate_size": cfg.hidden_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "dtype": "float32",
        "problem_type": "single_label_classification",
        "id2label": {str(i): lab for i, lab in enumerate(labels)},
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "pad_token_id": 0,  # right padding with id 0 and attention_mask 0 (encode_texts)
        "max_length": cfg.max_seq_len,  # tokens kept per text, from the left
        "temperature": temperature,  # probabilities = softmax(logits / temperature)
        "cascade": {"kind": "student", "max_length": cfg.max_seq_len, "temperature": temperature,
                    "pooling": "mean over attention_mask", "config": cfg.to_dict()},
    }
    if tagging:
        out["cascade"].update(tagging)
        out["id2tag"] = {str(i): t for i, t in enumerate(tagging["tags"])}
    return out


def _bert_student_hf_config(cfg: StudentConfig, labels: list[str], temperature: float) -> dict:
    """An `EncoderStudent`'s config.json: its BERT fields as transformers writes them (AutoConfig
    loads a `BertConfig`; the weights are `BertModel`'s under `bert.` plus our `head.`), the same
    label, length and temperature keys as the cascade kind, and our config under `cascade`."""
    bert = {k: v for k, v in cfg.bert_config().to_dict().items()
            if k not in ("architectures", "id2label", "label2id", "transformers_version", "dtype", "torch_dtype")}
    return {
        **bert,
        "architectures": ["CascadeEncoderStudentClassifier"],
        "model_type": "bert",
        "torch_dtype": "float32",
        "dtype": "float32",
        "problem_type": "single_label_classification",
        "id2label": {str(i): lab for i, lab in enumerate(labels)},
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "pad_token_id": 0,  # [PAD]; right padding with attention_mask 0 (encode_texts)
        "max_length": cfg.max_seq_len,  # tokens kept per text, from the left ([CLS] first)
        "temperature": temperature,
        "cascade": {"kind": "student", "max_length": cfg.max_seq_len, "temperature": temperature,
                    "pooling": "mean over attention_mask", "token_type_ids": "zeros", "config": cfg.to_dict()},
    }


def is_student_config(raw: dict) -> bool:
    """A student's config.json, this layout or the old one (`model_type: cascade-student`)."""
    return raw.get("model_type") == "cascade-student" or (raw.get("cascade") or {}).get("kind") == "student"


def student_config(raw: dict, where: str = "config.json") -> StudentConfig:
    if raw.get("model_type") == "cascade-student":  # the old layout: StudentConfig's fields at the top
        return StudentConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    if not is_student_config(raw):
        raise ValueError(f"{where}: not a student config (no cascade.kind = 'student')")
    return StudentConfig(**raw["cascade"]["config"])


def student_tokenizer_config(tokenizer_json, max_len: int) -> dict:
    """tokenizer_config.json: transformers' AutoTokenizer pads and truncates as the tier does
    (right side, id 0, at most `max_len` tokens)."""
    from tokenizers import Tokenizer

    pad = Tokenizer.from_file(str(tokenizer_json)).id_to_token(0)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "padding_side": "right",
            "truncation_side": "right", "pad_token": pad, "model_input_names": ["input_ids", "attention_mask"]}


def save_student(model: nn.Module, out_dir, tokenizer_json, labels: list[str], extra: dict | None = None,
                 temperature: float = 1.0, tagging: dict | None = None):
    """Student dir: model.safetensors, config.json (`student_hf_config`), tokenizer.json,
    tokenizer_config.json, cascade.json. Paths in `extra` under `data`/`teacher` are stored
    relative to the student dir, so the dir can move with what it names. A tagging student
    passes `tagging` = {"task", "fields", "tags"}: written to config.json and cascade.json."""
    import json
    import os
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from training.hf_io import make_world_readable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    if Path(tokenizer_json) != out / "tokenizer.json":
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    meta = {"kind": "student", "labels": labels, **(extra or {}), **(tagging or {})}
    for key in ("data", "teacher"):
        if meta.get(key) is not None:
            meta[key] = os.path.relpath(Path(meta[key]).resolve(), out.resolve())
    files = {"config.json": student_hf_config(model.cfg, labels, temperature, tagging), "cascade.json": meta,
             "tokenizer_config.json": student_tokenizer_config(out / "tokenizer.json", model.cfg.max_seq_len)}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=1) + "\n")
    make_world_readable(out)
    return out


def load_student(model_dir) -> nn.Module:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(model_dir)
    model = make_student(student_config(json.loads((d / "config.json").read_text()), str(d / "config.json")))
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.eval()
