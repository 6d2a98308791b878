"""Build a tiny random-weight Llama checkpoint directory that vLLM can serve offline.

No model hub is reachable from CI, so tests, the demo and the benchmarks make their own model: a Llama
``config.json``, a byte-level BPE tokenizer trained locally and seeded random weights in ``model.safetensors``.
(vLLM's ``load_format="dummy"`` also works with the directory, but its near-zero weights make almost every logit a
tie, so greedy outputs would hang on rounding noise; the seeded weights give well-separated logits.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill and decode share one GPU and one KV cache.",
    "Large language models generate text one token at a time.",
    "Serving systems trade latency against throughput.",
    "Hello world! How are you today? I am fine, thank you.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ? !",
]


def make_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 8192,
    seed: int = 0,
) -> Path:
    """Write config.json, weights, tokenizer files and a chat template to ``path``; return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": max_position_embeddings,
                "chat_template": (
                    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}"
                ),
            }
        )
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _write_random_weights(path / "model.safetensors", config, seed)
    return path


def train_tokenizer(vocab_size: int, special_tokens: tuple[str, ...] = ("<s>", "</s>")) -> Any:
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) trained on a small corpus; the special tokens get the
    first ids (``<s>`` 0, ``</s>`` 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tokenizer


def _write_random_weights(file: Path, config: dict, seed: int) -> None:
    """Seeded weights scaled like a trained model's (unit-variance activations), so logits are well separated."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / in_features**0.5

    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": linear(vocab, hidden) * 4.0,
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors |= {
            prefix + "self_attn.q_proj.weight": linear(q_out, hidden),
            prefix + "self_attn.k_proj.weight": linear(kv_out, hidden),
            prefix + "self_attn.v_proj.weight": linear(kv_out, hidden),
            prefix + "self_attn.o_proj.weight": linear(hidden, q_out),
            prefix + "mlp.gate_proj.weight": linear(inter, hidden),
            prefix + "mlp.up_proj.weight": linear(inter, hidden),
            prefix + "mlp.down_proj.weight": linear(hidden, inter),
            prefix + "input_layernorm.weight": torch.ones(hidden),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
