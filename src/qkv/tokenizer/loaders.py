"""`load_tokenizer`: find out what a path holds and build the Tokenizer it describes.

Formats, in the order a directory is searched:

- ``tokenizer.json`` (Hugging Face `tokenizers`), with ``tokenizer_config.json`` /
  ``special_tokens_map.json`` / ``chat_template.jinja`` for special-token roles and chat template;
- ``vocab.json`` + ``merges.txt`` (GPT-2 byte-level BPE, as transformers' GPT2TokenizerFast);
- ``vocab.txt`` (BERT WordPiece, as transformers' BertTokenizerFast: ``do_lower_case`` from the
  config, default True);
- ``*.tiktoken`` rank files (see :mod:`qkv.tokenizer.tiktoken_format`);
- ``*.gguf`` (the vocabulary in the metadata, see :mod:`qkv.tokenizer.gguf_vocab`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from qkv import hub
from qkv.errors import TokenizerError
from qkv.tokenizer.base import SPECIAL_ROLES, Tokenizer
from qkv.tokenizer.files import read_json, read_text
from qkv.tokenizer.gguf_vocab import load_gguf_tokenizer
from qkv.tokenizer.tiktoken_format import tokenizer_from_tiktoken

_GGUF_MAGIC = b"GGUF"


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """The tokenizer at ``source``: a directory, one tokenizer file, or a known model name
    (``qkv.hub``, pulled if needed). What the path holds decides the format (see module doc)."""
    try:
        path = hub.resolve(source)
    except FileNotFoundError as exc:
        raise TokenizerError(str(exc)) from None
    if path.is_dir():
        return _load_directory(path)
    return _load_file(path)


def _load_directory(directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer_json(directory / "tokenizer.json", config_dir=directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return load_vocab_merges(directory / "vocab.json", directory / "merges.txt")
    if (directory / "vocab.txt").is_file():
        return load_wordpiece_vocab(directory / "vocab.txt")
    for pattern, load in (("*.tiktoken", tokenizer_from_tiktoken), ("*.gguf", load_gguf_tokenizer)):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return load(found[0])
        if len(found) > 1:
            raise TokenizerError(
                f"{directory} holds several {pattern} files ({', '.join(p.name for p in found)}); pass one of them"
            )
    raise TokenizerError(
        f"{directory} holds no tokenizer: expected tokenizer.json, vocab.json + merges.txt, vocab.txt, "
        "a .tiktoken rank file or a .gguf file"
    )


def _load_file(path: Path) -> Tokenizer:
    name, suffix = path.name, path.suffix.lower()
    if suffix == ".gguf" or _starts_with(path, _GGUF_MAGIC):
        return load_gguf_tokenizer(path)
    if suffix == ".tiktoken":
        return tokenizer_from_tiktoken(path)
    if name in ("vocab.json", "merges.txt"):
        vocab, merges = path.with_name("vocab.json"), path.with_name("merges.txt")
        if not (vocab.is_file() and merges.is_file()):
            raise TokenizerError(f"{path}: a GPT-2 vocabulary needs both vocab.json and merges.txt next to each other")
        return load_vocab_merges(vocab, merges)
    if name == "vocab.txt":
        return load_wordpiece_vocab(path)
    if suffix == ".json":
        return load_tokenizer_json(path, config_dir=path.parent if name == "tokenizer.json" else None)
    raise TokenizerError(
        f"cannot tell what kind of tokenizer {path} is: expected tokenizer.json, vocab.json, merges.txt, "
        "vocab.txt, a .tiktoken or a .gguf file (or a directory holding one)"
    )


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


# ----- tokenizer_config.json -----------------------------------------------------------------------


def read_tokenizer_config(directory: Path | None) -> dict[str, Any]:
    """tokenizer_config.json, with roles that only special_tokens_map.json names and the template
    of chat_template.jinja (which newer transformers versions write instead of the config key)."""
    if directory is None:
        return {}
    config_path = directory / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    map_path = directory / "special_tokens_map.json"
    if map_path.is_file():
        for role, token in read_json(map_path, "special tokens map").items():
            if config.get(role) is None:
                config[role] = token
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        config["chat_template"] = read_text(jinja_path, "chat template")
    return config


def _roles(config: dict[str, Any]) -> dict[str, str]:
    """Role -> token string; config values may be strings or AddedToken dicts ({"content": ...})."""
    roles = {}
    for role in SPECIAL_ROLES:
        value = config.get(role)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            roles[role] = value
    return roles


def _chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _added_tokens(config: dict[str, Any], roles: dict[str, str]) -> list[tuple[int | None, AddedToken]]:
    """Added tokens a vocab.json/vocab.txt tokenizer keeps outside its vocabulary file, with their
    ids where known: ``added_tokens_decoder`` of the config, then the role tokens and
    ``additional_special_tokens`` as special tokens."""
    added: list[tuple[int | None, AddedToken]] = []
    for key, spec in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("content"), str) and str(key).isdigit():
            special = bool(spec.get("special", False))
            token = AddedToken(
                spec["content"],
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", not special)),
                special=special,
            )
            added.append((int(key), token))
    extra = [t.get("content") if isinstance(t, dict) else t for t in config.get("additional_special_tokens") or ()]
    listed = {token.content for _, token in added}
    for token in dict.fromkeys([*roles.values(), *extra]):
        if isinstance(token, str) and token not in listed:
            added.append((None, AddedToken(token, special=True, normalized=False)))
    return added


def _give_ids(vocab: dict[str, int], added: list[tuple[int | None, AddedToken]]) -> None:
    """Put added tokens into the model's vocabulary with the id the config gives them, so the
    engine keeps that id; one with no id is appended after the vocabulary, as transformers does."""
    for token_id, token in added:
        if token_id is not None and token.content not in vocab:
            vocab[token.content] = token_id


def _register(engine: tokenizers.Tokenizer, added: list[tuple[int | None, AddedToken]]) -> None:
    engine.add_special_tokens([token for _, token in added if token.special])
    engine.add_tokens([token for _, token in added if not token.special])


# ----- formats -------------------------------------------------------------------------------------


def load_tokenizer_json(path: Path, config_dir: Path | None = None) -> Tokenizer:
    """A Hugging Face tokenizer.json (+ the config files in ``config_dir``)."""
    text = read_text(path, "tokenizer file")
    try:
        engine = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the engine raises a bare Exception on bad JSON
        read_json(path, "tokenizer file")  # a JSON syntax error gets its line and column
        raise TokenizerError(f"tokenizer file {path} is not a valid tokenizer.json: {exc}") from None
    config = read_tokenizer_config(config_dir)
    roles = _roles(config)
    vocab = engine.get_vocab(with_added_tokens=True)
    for role, token in list(roles.items()):
        if token not in vocab:  # configs name tokens the vocabulary lacks (an unused pad_token, ...)
            warnings.warn(f"{path}: {role} {token!r} from the config is not in the vocabulary; ignored", stacklevel=3)
            del roles[role]
    unk = getattr(engine.model, "unk_token", None)
    if "unk_token" not in roles and unk and engine.token_to_id(unk) is not None:
        roles["unk_token"] = unk
    return Tokenizer(
        engine,
        special_tokens=roles,
        chat_template=_chat_template(config),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
        source_format="tokenizer.json",
    )


def read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges of a GPT-2 merges.txt (``#version`` header, one ``left right`` per line)."""
    merges = []
    for lineno, line in enumerate(read_text(path, "merges file").split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"merges file {path} line {lineno}: expected 'left right', got {line[:80]!r}")
        left, right = parts
        for token in (left, right, left + right):
            if token not in vocab:
                raise TokenizerError(
                    f"merges file {path} line {lineno}: {token!r} is not in the vocabulary (vocab.json); "
                    "do the two files belong together?"
                )
        merges.append((left, right))
    return merges


def load_vocab_merges(vocab_path: Path, merges_path: Path) -> Tokenizer:
    """GPT-2's vocab.json + merges.txt: byte-level BPE as transformers' GPT2TokenizerFast builds it."""
    vocab = read_json(vocab_path, "vocabulary file")
    for token, token_id in vocab.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise TokenizerError(f"vocabulary file {vocab_path}: token {token!r} has id {token_id!r}, not an id")
    merges = read_merges(merges_path, vocab)
    config = read_tokenizer_config(vocab_path.parent)
    roles = _roles(config)
    added = _added_tokens(config, roles)
    added_path = vocab_path.parent / "added_tokens.json"  # transformers' legacy format
    if added_path.is_file():
        listed = {token.content for _, token in added}
        for token, token_id in read_json(added_path, "added tokens file").items():
            if token not in listed:
                added.append((token_id, AddedToken(token, special=False, normalized=False)))
    _give_ids(vocab, added)
    engine = tokenizers.Tokenizer(
        BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    engine.decoder = decoders.ByteLevel()
    engine.post_processor = processors.ByteLevel(trim_offsets=False)
    _register(engine, added)
    if config.get("add_bos_token") and "bos_token" in roles:
        bos = roles["bos_token"]
        engine.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    return Tokenizer(
        engine, special_tokens=roles, chat_template=_chat_template(config), source_format="vocab.json+merges.txt"
    )


def read_wordpiece_vocab(path: Path) -> dict[str, int]:
    """A BERT vocab.txt: one token per line, the line number (from 0) is its id."""
    lines = read_text(path, "vocabulary file").split("\n")
    if lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for token_id, line in enumerate(lines):
        token = line.rstrip("\r")
        if not token:
            raise TokenizerError(f"vocabulary file {path} line {token_id + 1} is empty")
        if token in vocab:
            raise TokenizerError(
                f"vocabulary file {path} line {token_id + 1}: token {token!r} "
                f"already appears on line {vocab[token] + 1}"
            )
        vocab[token] = token_id
    return vocab


def load_wordpiece_vocab(path: Path) -> Tokenizer:
    """BERT's vocab.txt as transformers' BertTokenizerFast builds it (lowercasing unless the
    config says ``do_lower_case: false``; ``[CLS] … [SEP]`` added on encode)."""
    vocab = read_wordpiece_vocab(path)
    config = read_tokenizer_config(path.parent)
    roles = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
    roles |= {"mask_token": "[MASK]"} | _roles(config)
    added = _added_tokens(config, roles)
    _give_ids(vocab, added)
    for role in ("unk_token", "cls_token", "sep_token"):
        if roles[role] not in vocab:
            raise TokenizerError(f"vocabulary file {path} has no {role} {roles[role]!r}")
    engine = tokenizers.Tokenizer(WordPiece(vocab, unk_token=roles["unk_token"], max_input_chars_per_word=100))
    engine.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=bool(config.get("do_lower_case", True)),
    )
    engine.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    engine.decoder = decoders.WordPiece(prefix="##")
    cls, sep = roles["cls_token"], roles["sep_token"]
    engine.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    _register(engine, added)
    return Tokenizer(engine, special_tokens=roles, chat_template=_chat_template(config), source_format="vocab.txt")
