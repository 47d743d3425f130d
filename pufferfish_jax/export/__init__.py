"""Leaving the island: Hugging Face Llama folders and GGUF files out (write.py), Llama checkpoints in
(hf_import.py), through the one map between their conventions and ours (llama_map.py)."""
