"""The base model: a small ``LlamaForCausalLM`` pre-trained here on :mod:`.corpus`, cached on disk.

The cache key is the sha256 of the model/pre-training config together with the corpus fingerprint, so a change
of either (or of the Python whose stdlib is the text) trains a new base; otherwise later runs load it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from mgpo_kernels.bench import common as C
from . import corpus

#: keys of a preset that define the base model and its pre-training (and so its cache key)
BASE_KEYS = ("hidden", "intermediate", "layers", "heads", "vocab", "seq", "corpus_bytes", "pretrain_steps",
             "pretrain_batch", "pretrain_lr")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mgpo_kernels" / "stability"


def base_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {k: cfg[k] for k in BASE_KEYS}


def cache_key(bcfg: Dict[str, Any], data_fp: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "config": bcfg, "data": data_fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def llama_config(bcfg: Dict[str, Any], pad_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=bcfg["vocab"], hidden_size=bcfg["hidden"], intermediate_size=bcfg["intermediate"],
                       num_hidden_layers=bcfg["layers"], num_attention_heads=bcfg["heads"],
                       num_key_value_heads=bcfg["heads"], max_position_embeddings=max(bcfg["seq"], 256),
                       tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)


def _token_stream(tok, texts, eos_id: int) -> torch.Tensor:
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(bcfg: Dict[str, Any], texts, device: torch.device, progress: bool = True):
    """Train the tokenizer and the model from scratch (AdamW, warm-up + cosine, random windows of the text)."""
    from transformers import LlamaForCausalLM

    tok = corpus.train_tokenizer(texts, bcfg["vocab"])
    pad_id, eos_id = corpus.special_ids(tok)
    stream = _token_stream(tok, texts, eos_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(bcfg, pad_id, eos_id)).to(device)
    steps, seq, bs = bcfg["pretrain_steps"], bcfg["seq"], bcfg["pretrain_batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=bcfg["pretrain_lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(0)
    losses = []
    bar = C.tqdm(range(steps), desc="pre-training the base model", disable=not progress)
    model.train()
    for _ in bar:
        starts = torch.randint(0, len(stream) - seq - 1, (bs,), generator=gen)
        x = torch.stack([stream[s:s + seq] for s in starts.tolist()]).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix_str(f"loss {sum(losses[-20:]) / 20:.3f}")
    bar.close()
    model.eval()
    return model, tok, {"tokens": int(len(stream)), "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                        "first_loss": losses[0]}


def load_or_pretrain(cfg: Dict[str, Any], device: torch.device, cache_dir: Optional[str] = None,
                     progress: bool = True) -> Tuple[Any, Any, Dict[str, Any]]:
    """(model on ``device``, tokenizer, info) from the cache, pre-training and saving it first if absent."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    bcfg = base_config(cfg)
    texts = corpus.corpus_texts(bcfg["corpus_bytes"])
    key = cache_key(bcfg, corpus.fingerprint(texts))
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / key
    info_path = path / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        model = LlamaForCausalLM.from_pretrained(str(path)).to(device).eval()
        info["cached"] = True
        info["path"] = str(path)
        return model, tok, info
    t0 = time.perf_counter()
    model, tok, stats = pretrain(bcfg, texts, device, progress)
    info = {"key": key, "config": bcfg, "corpus_files": len(texts), "pretrain_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()), "device": str(device), **stats}
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save(str(path / "tokenizer.json"))
    info_path.write_text(json.dumps(info, indent=1))
    info["cached"] = False
    info["path"] = str(path)
    return model, tok, info
