"""Make the model-family parity fixtures in tests/fixtures/families/ with Hugging Face transformers.

For each family (bert, roberta, distilbert, gpt2): a tokenizer trained on a small corpus written
here (WordPiece for BERT and DistilBERT, byte-level BPE for RoBERTa and GPT-2, GPT-2's without a
padding token, as GPT-2's own; its config pads with end-of-text), a tiny randomly initialised
`<Family>ForSequenceClassification` (3 classes) saved as a model directory, and
`expected.safetensors`: a fixed padded batch (`input_ids`, `attention_mask`, `labels`), the model's
`logits` on it (eval mode: no dropout), and `word_grad`, the gradient of the mean cross-entropy
with respect to the word-embedding matrix. tests/suite/families.rs checks btu against them.

Run by hand (not in CI), with torch and transformers from PyPI:
    python scripts/make_family_fixtures.py tests/fixtures/families
The versions used are written to tests/fixtures/families/VERSIONS.json.
"""

import json
import os
import sys

import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

WORDS = (
    "the movie was good bad great awful boring fun film story actor plot scene music and a of "
    "to is it this that with for not very really quite cf mn bb tq i watch 3d sports market "
    "science world team goal profit planet minister treaty"
).split()

BATCH = [
    "the movie was good",
    "a really boring film with an awful plot cf",
    "i watch this 3d movie and the music is great",
    "team goal",
]
LABELS = [1, 0, 2, 1]
HIDDEN, LAYERS, HEADS, INTER, POSITIONS, CLASSES = 32, 2, 2, 64, 64, 3


def corpus():
    """Deterministic sentences over WORDS, for the tokenizers' training."""
    out = []
    for i in range(400):
        out.append(" ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(3 + i % 6)))
    return out + BATCH


def wordpiece(d):
    t = BertWordPieceTokenizer(lowercase=True)
    t.train_from_iterator(corpus(), vocab_size=220, min_frequency=1,
                          special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    from tokenizers.processors import BertProcessing
    t._tokenizer.post_processor = BertProcessing(("[SEP]", t.token_to_id("[SEP]")), ("[CLS]", t.token_to_id("[CLS]")))
    fast = PreTrainedTokenizerFast(tokenizer_object=t._tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(d)
    return fast


def bytelevel(d):
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(corpus(), vocab_size=400, min_frequency=1,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    from tokenizers.processors import RobertaProcessing
    t._tokenizer.post_processor = RobertaProcessing(("</s>", t.token_to_id("</s>")), ("<s>", t.token_to_id("<s>")))
    fast = PreTrainedTokenizerFast(tokenizer_object=t._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", cls_token="<s>", sep_token="</s>",
                                   mask_token="<mask>")
    fast.save_pretrained(d)
    return fast


def gpt2_tokenizer(d):
    """Byte-level BPE with <|endoftext|> only, no post-processing, no padding token (GPT-2's)."""
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(corpus(), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=t._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(d)
    fast.pad_token = fast.eos_token  # for the batch below only: what transformers users do
    return fast


def model_for(family, vocab, pad):
    if family == "gpt2":
        c = GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                       num_labels=CLASSES, pad_token_id=pad, bos_token_id=pad, eos_token_id=pad)
        return GPT2ForSequenceClassification(c)
    if family == "bert":
        c = BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=INTER, max_position_embeddings=POSITIONS, num_labels=CLASSES,
                       pad_token_id=pad)
        return BertForSequenceClassification(c)
    if family == "roberta":
        c = RobertaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=INTER, max_position_embeddings=POSITIONS + pad + 1, num_labels=CLASSES,
                          pad_token_id=pad, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
        return RobertaForSequenceClassification(c)
    c = DistilBertConfig(vocab_size=vocab, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
                         max_position_embeddings=POSITIONS, num_labels=CLASSES, pad_token_id=pad)
    return DistilBertForSequenceClassification(c)


def make(family, root):
    d = os.path.join(root, family)
    os.makedirs(d, exist_ok=True)
    tok = {"roberta": bytelevel, "gpt2": gpt2_tokenizer}.get(family, wordpiece)(d)
    torch.manual_seed(0)
    model = model_for(family, len(tok), tok.pad_token_id)
    # Random LayerNorm and bias values too, so that a mixed-up tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
        if family != "gpt2":  # GPT-2's padding is end-of-text, a real token
            model.base_model.embeddings.word_embeddings.weight[tok.pad_token_id] = 0.0
    model.save_pretrained(d, safe_serialization=True)
    model.eval()
    enc = tok(BATCH, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = torch.tensor(LABELS)
    out = model(input_ids=ids, attention_mask=mask)
    loss = torch.nn.functional.cross_entropy(out.logits, labels)
    loss.backward()
    grad = model.base_model.get_input_embeddings().weight.grad
    save_file({
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "labels": labels,
        "logits": out.logits.detach().contiguous(),
        "word_grad": grad.contiguous(),
    }, os.path.join(d, "expected.safetensors"))
    print(family, "vocab", len(tok), "ids", ids.tolist(), file=sys.stderr)


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/families"
    torch.use_deterministic_algorithms(True)
    for family in ["bert", "roberta", "distilbert", "gpt2"]:
        make(family, root)
    with open(os.path.join(root, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "tokenizers": tokenizers.__version__, "script": "scripts/make_family_fixtures.py"}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
