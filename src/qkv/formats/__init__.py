"""File formats qkv reads without trusting them, shared by `qkv.checkpoints` and `qkv.tokenizer`.

- `gguf`: llama.cpp's GGUF (header, metadata, tensor table, dequantized tensor data);
- `safetensors`: the safetensors header checked against the file, lazy tensors, atomic writes;
- `jsonfile`: JSON from user files, with every failure (syntax, encoding, nesting) a qkv error.

Each reader checks every size, count and offset a file claims against the bytes it has before
allocating or looping over anything, and reports a problem as a `CheckpointError` (or the error
type the caller names) that says which file and what is wrong. These modules import no model code,
so a tokenizer can read a GGUF vocabulary without building a model.
"""
