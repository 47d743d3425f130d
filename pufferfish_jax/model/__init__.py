"""The Llama-style decoder: what a model is (`spec`), its building blocks (`layers`), attention and
its KV cache (`attention`), mixture of experts (`moe`), and the assembled `Transformer` with its
parameter count and FLOP model (`transformer`)."""
