"""Build a tiny random-weight Idefics3 (SigLIP-style vision tower + pixel-shuffle connector + Llama) that vLLM can
serve offline.

As with the tiny Llama (``vllm_rapid.testing.tiny_model``), no model hub is reachable: the checkpoint is made from
transformers' own config and model classes with seeded weights scaled like a trained model's (transformers'
initializer would make almost every logit a tie), the tokenizer is trained locally with Idefics3's image tokens,
and the image processor is Idefics3's PIL one. Why Idefics3: vLLM 0.32's LLaVA, PaliGemma, Qwen2-VL and Gemma 3
paths import transformers image processors that need torchvision, which vLLM's CPU build here lacks (PyPI's
torchvision fails to import beside the CPU torch); vLLM runs Idefics3 with the PIL image processor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vllm_rapid.testing.tiny_model import train_tokenizer

IMAGE_TOKEN = "<image>"
# What Idefics3's processor looks up in the tokenizer (it adds the first three itself when they are missing).
_IMAGE_TOKENS = ("<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>",
                 *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def make_tiny_idefics3(
    path: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    image_size: int = 112,
    patch_size: int = 14,
    scale_factor: int = 2,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Write config, weights, tokenizer and processor files to ``path``; return the path.

    Images are not split into tiles: each becomes ``<fake_token_around_image><global-img>``, then
    ``((image_size // patch_size) // scale_factor) ** 2`` ``<image>`` tokens (16 by default), then
    ``<fake_token_around_image>``, wherever the prompt has its ``<image>``.
    """
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(vocab_size, ("<s>", "</s>", *_IMAGE_TOKENS)).save(str(path / "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
        model_max_length=max_position_embeddings,
    )
    image_seq_len = ((image_size // patch_size) // scale_factor) ** 2
    text_config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 2, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size,
    )
    config = Idefics3Config(
        text_config=text_config, vision_config=vision_config, scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), pad_token_id=1, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    _scale_like_trained(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len)
    processor.save_pretrained(path)
    _check_written(path)
    return path


def _scale_like_trained(model: Any, gen: Any) -> None:
    """Seeded weights with unit-variance activations: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms the
    identity, biases 0, the LM head 4x (well-separated logits, as the tiny Llama's)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif param.ndim == 1:
                param.zero_()
            elif "embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                scale = 4.0 if name.startswith("lm_head") else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * scale / math.prod(param.shape[1:]) ** 0.5)


def _check_written(path: Path) -> None:
    """The files vLLM reads: weights, model and processor configs, tokenizer."""
    config = json.loads((path / "config.json").read_text())
    if config.get("architectures") != ["Idefics3ForConditionalGeneration"]:
        raise RuntimeError(f"unexpected architectures in {path / 'config.json'}: {config.get('architectures')}")
    files = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json")
    if missing := [f for f in files if not (path / f).exists()]:
        raise RuntimeError(f"tiny Idefics3 at {path} lacks {missing}")
