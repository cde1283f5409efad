"""Build a tiny random-weight Llama with a real tokenizer and chat template, for a real vLLM
engine on the CPU. Its outputs are gibberish; its tokenization, chat templating, prefix
caching, KV events and metrics are vLLM's own. Run with the engine venv's python."""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: str, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = Path(out)
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
