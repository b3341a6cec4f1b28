"""Checkpoint I/O (safetensors, HF and PEFT dirs), the blob codecs, and the local store."""
