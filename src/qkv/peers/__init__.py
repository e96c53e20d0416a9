"""Runners for peer libraries (llama.cpp) that qkv is benchmarked against; benchmark-only, never imported by qkv."""
