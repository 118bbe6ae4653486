#!/usr/bin/env python3
"""Writes the expected outputs that gyre's tokenizer and chat-template tests compare against.

References:
  * token ids and decoded text: the Python `tokenizers` library (Hugging Face), reading the same
    tokenizer.json files the Rust tests read;
  * rendered chat prompts: `transformers`' `apply_chat_template(tokenize=False)`, i.e. its jinja2
    environment, on the real tokenizer_config.json files plus the test templates in the fixture
    directory.

The tokenizer files come from tools/fetch_test_assets.sh (tests-assets/ at the repository root);
they are not committed, only the small JSON outputs written here are.

Usage (from the repository root):
    tools/fetch_test_assets.sh
    pip install tokenizers transformers jinja2
    python3 tools/make_tokenizer_fixtures.py [--assets tests-assets] [--out crates/gyre/tests/fixtures/tokenizers]
"""

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "crates" / "gyre" / "tests" / "fixtures" / "tokenizers"
TOKENIZERS = ("llama2", "gemma3")

# A varied corpus: plain English, whitespace runs, CRLF, code, many scripts, emoji (which
# SentencePiece vocabularies mostly encode as byte-fallback pieces), special-token text, empty.
CORPUS = [
    "",
    "Hello world",
    "Hello, my dog is cute",
    " leading space",
    "trailing space ",
    "  multiple   spaces   inside  ",
    "Tabs\tand\nnewlines\r\nCRLF line\r\n",
    "\n\n\n",
    "    indented code",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'fn main() { println!("{}", 1 << 3); }',
    "你好，世界！今天天气很好。",
    "こんにちは世界、カタカナとひらがな",
    "안녕하세요 세계",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Ünïcödé façade naïve Ελληνικά",
    "🦀🚀 emoji 👩‍👩‍👧‍👦 family 🏳️‍🌈 flag",
    "mixed 你好 and 😀 inside English",
    "<s>inside</s> special text",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "3.14159 1,000,000 2024-01-01 0x1F",
    "\u00a0nbsp\u200bzero-width a\u0301 combining",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 mathematical letters",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...---***",
    "https://example.com/path?q=1&r=2#frag",
]

# Conversations rendered with each template, with and without the generation prompt.
CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "Hello! How are you?"}]),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "2+2 is 4."},
            {"role": "user", "content": "  And 3+3?  \n"},
        ],
    ),
    (
        "multilingual",
        [
            {"role": "user", "content": "你好，世界！🌍 Ça va?"},
            {"role": "assistant", "content": "Très bien 😀"},
            {"role": "user", "content": "日本語で答えて"},
        ],
    ),
    (
        "whitespace",
        [
            {"role": "user", "content": "#line one\n\nline two\r\n\ttabbed  "},
            {"role": "assistant", "content": "  padded  "},
            {"role": "user", "content": "# hash start"},
        ],
    ),
    ("json_chars", [{"role": "user", "content": 'quote " backslash \\ <tag> & \u0001 ctrl é'}]),
    ("empty_system", [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]),
    ("non_alternating", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_fixture(path: Path, header: dict, cases: list) -> None:
    """Writes {header..., "cases": [...]} with one case per line, so diffs stay readable."""
    lines = ["{"]
    for key, value in header.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append('  "cases": [')
    for i, case in enumerate(cases):
        sep = "," if i + 1 < len(cases) else ""
        lines.append("    " + json.dumps(case, ensure_ascii=False) + sep)
    lines.append("  ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)} ({len(cases)} cases)")


def encode_fixtures(assets: Path, out: Path) -> None:
    import tokenizers

    for name in TOKENIZERS:
        path = assets / name / "tokenizer.json"
        tok = tokenizers.Tokenizer.from_file(str(path))
        cases = []
        for text in CORPUS:
            plain = tok.encode(text, add_special_tokens=False).ids
            special = tok.encode(text, add_special_tokens=True).ids
            cases.append(
                {
                    "text": text,
                    "ids": plain,
                    "ids_with_special": special,
                    "decoded": tok.decode(special, skip_special_tokens=False),
                    "decoded_skip_special": tok.decode(special, skip_special_tokens=True),
                }
            )
        header = {
            "reference": f"python tokenizers {tokenizers.__version__}",
            "tokenizer": f"tests-assets/{name}/tokenizer.json",
            "tokenizer_sha256": sha256(path),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        }
        write_fixture(out / f"{name}_encode.json", header, cases)


def render_cases(tok, raw, template, conversations):
    """Renders every conversation with and without the generation prompt, recording raises.

    `tok` is the transformers tokenizer that renders; `raw` is the `tokenizers` library's view
    of the same tokenizer.json, which gives the ids (transformers may rebuild the tokenizer's
    pipeline from tokenizer_config.json, e.g. Llama's `legacy` flag, and split differently).
    """
    import jinja2

    cases = []
    for conv_name, messages in conversations:
        for agp in (False, True):
            case = {"name": conv_name, "messages": messages, "add_generation_prompt": agp}
            try:
                rendered = tok.apply_chat_template(
                    messages, chat_template=template, tokenize=False, add_generation_prompt=agp
                )
                case["rendered"] = rendered
                case["ids"] = raw.encode(rendered, add_special_tokens=False).ids
            except jinja2.exceptions.TemplateError as e:
                case["raises"] = str(e)
            cases.append(case)
    return cases


def chat_fixtures(assets: Path, out: Path) -> None:
    import jinja2
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    reference = (
        f"transformers {transformers.__version__} apply_chat_template (jinja2 {jinja2.__version__}); "
        f"ids: python tokenizers {tokenizers.__version__}"
    )
    raw = {n: tokenizers.Tokenizer.from_file(str(assets / n / "tokenizer.json")) for n in TOKENIZERS}
    with tempfile.TemporaryDirectory() as tmp:
        # llama2's package ships no chat template: pair its files with the test template, the
        # way a model directory carries chat_template.jinja.
        llama_dir = Path(tmp) / "llama2"
        llama_dir.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(assets / "llama2" / f, llama_dir / f)
        shutil.copy(out / "llama2_chat_template.jinja", llama_dir / "chat_template.jinja")
        llama = AutoTokenizer.from_pretrained(str(llama_dir))
        llama_template = (out / "llama2_chat_template.jinja").read_text(encoding="utf-8")
        if llama.chat_template != llama_template:
            sys.exit("transformers did not load chat_template.jinja from the llama2 directory")
        write_fixture(
            out / "llama2_chat.json",
            {"reference": reference, "template": "fixtures/tokenizers/llama2_chat_template.jinja"},
            render_cases(llama, raw["llama2"], None, CONVERSATIONS),
        )

        features = (out / "features_chat_template.jinja").read_text(encoding="utf-8")
        write_fixture(
            out / "features_chat.json",
            {
                "reference": reference,
                "template": "fixtures/tokenizers/features_chat_template.jinja",
                "tokenizer": "tests-assets/llama2",
            },
            render_cases(llama, raw["llama2"], features, [c for c in CONVERSATIONS if c[0] != "non_alternating"]),
        )

    gemma = AutoTokenizer.from_pretrained(str(assets / "gemma3"))
    write_fixture(
        out / "gemma3_chat.json",
        {"reference": reference, "template": "tests-assets/gemma3/tokenizer_config.json (chat_template)"},
        render_cases(gemma, raw["gemma3"], None, CONVERSATIONS),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=REPO / "tests-assets")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    for name in TOKENIZERS:
        if not (args.assets / name / "tokenizer.json").is_file():
            sys.exit(f"missing {args.assets / name / 'tokenizer.json'}: run tools/fetch_test_assets.sh first")
    args.out.mkdir(parents=True, exist_ok=True)
    encode_fixtures(args.assets, args.out)
    chat_fixtures(args.assets, args.out)


if __name__ == "__main__":
    main()
