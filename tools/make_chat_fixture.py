#!/usr/bin/env python3
"""End-to-end fixtures: a tiny Llama with its own trained tokenizer, for `gyre generate`/`chat`.

Reference: HF transformers `LlamaForCausalLM.generate` (greedy) and `PreTrainedTokenizerFast`
(`apply_chat_template`). Writes, under crates/gyre-cli/tests/fixtures/:

  tiny_chat/         model + tokenizer.json (Llama-style SentencePiece BPE with byte fallback,
                     trained here on /usr/share/common-licenses text) + tokenizer_config.json
                     carrying the SOLAR-instruct chat template verbatim
                     (the CLI tests copy it without chat_template to check the built-in
                     SOLAR fallback)
  expected.json      greedy continuations (ids and text) for `generate` and `chat` prompts

Run: python3 tools/make_chat_fixture.py   (needs torch, transformers, tokenizers)
"""
import json
import os
import shutil
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "gyre-cli", "tests", "fixtures")
SOLAR_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{% if message['content']%}"
    "{{'### System:\n' + message['content']+'\n\n'}}{% endif %}{% elif message['role'] == 'user' %}"
    "{{'### User:\n' + message['content']+'\n\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'### Assistant:\n'  + message['content']}}{% endif %}{% if loop.last and add_generation_prompt %}"
    "{{ '### Assistant:\n' }}{% endif %}{% endfor %}"
)
SPECIALS = ["<unk>", "<s>", "</s>"]


def corpus():
    text = []
    for name in ["Apache-2.0", "GPL-3", "Artistic"]:
        path = os.path.join("/usr/share/common-licenses", name)
        with open(path, encoding="utf-8") as f:
            text.append(f.read())
    return text


def train_tokenizer(vocab_size):
    """A Llama-2-shaped tokenizer: ids 0..2 specials, 3..258 the byte-fallback tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, s in enumerate(SPECIALS)
    ]
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ]).__getstate__())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    return Tokenizer.from_str(json.dumps(spec)), len(vocab)


def main():
    torch.manual_seed(7)
    tok, vocab = train_tokenizer(512)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Byte-fallback rows get logit 0, below the best learned piece, so greedy output is
        # readable text (random byte tokens would decode to U+FFFD and control characters).
        model.lm_head.weight[3:259] = 0.0
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     add_bos_token=True, chat_template=SOLAR_TEMPLATE)
    expected = {"torch": torch.__version__, "transformers": transformers.__version__}

    def greedy(ids, n=24):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
        new = out[0, len(ids):].tolist()
        if 2 in new:
            new = new[: new.index(2)]
        return new, hf_tok.decode(new, skip_special_tokens=True)

    cases = []
    for prompt in ["The licence grants", "Copyright holders may"]:
        ids = hf_tok(prompt)["input_ids"]
        new, text = greedy(ids)
        cases.append({"prompt": prompt, "prompt_ids": ids, "ids": new, "text": text})
    expected["generate"] = cases
    chats = []
    for msg in ["What does the licence say?"]:
        rendered = hf_tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                              add_generation_prompt=True)
        ids = hf_tok(rendered)["input_ids"]
        new, text = greedy(ids)
        chats.append({"message": msg, "rendered": rendered, "prompt_ids": ids, "ids": new, "text": text})
    expected["chat"] = chats
    # A long greedy continuation for the logits of a step-by-step run.
    expected["logits_tokens"] = cases[0]["prompt_ids"] + cases[0]["ids"][:6]
    with torch.no_grad():
        expected["logits_last"] = model(torch.tensor([expected["logits_tokens"]])).logits[0, -1].tolist()

    for name, template in [("tiny_chat", SOLAR_TEMPLATE)]:
        d = os.path.join(ROOT, name)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d, safe_serialization=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        tc = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 512}
        if template:
            tc["chat_template"] = template
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(tc, f, indent=2)
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    for c in cases + chats:
        print(repr(c.get("prompt", c.get("message"))), "->", repr(c["text"]))


if __name__ == "__main__":
    sys.exit(main())
