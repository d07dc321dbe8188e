"""A small Llama-architecture model with random weights and a word-level tokenizer, built locally
(nothing downloaded), for demos and tests of the vLLM connector on CPU.

Geometry: 4 layers, hidden 512, 8 query heads and 4 KV heads of 64, float32. KV per token:
4 layers x 2 (K, V) x 4 heads x 64 x 4 B = 8 KiB, so a 128-token vLLM block is 1 MiB.
"""
import os

VOCAB = 8192
FIRST_WORD = 3  # ids 0..2 are <unk>, <s>, </s>


def build(out_dir: str, *, seed: int = 0, layers: int = 4) -> str:
    """Write config, weights and tokenizer to out_dir (kept if already built with this seed)."""
    marker = os.path.join(out_dir, f".built-seed{seed}-layers{layers}")
    if os.path.exists(marker):
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(FIRST_WORD, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words back joined by spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out_dir)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=16384, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    open(marker, "w").close()
    return out_dir


def prompt_ids(n: int, seed: int) -> list[int]:
    """n token ids of a deterministic random prompt (no BOS: the ids are the whole prompt)."""
    import random
    rng = random.Random(seed)
    return [rng.randrange(FIRST_WORD, VOCAB) for _ in range(n)]
