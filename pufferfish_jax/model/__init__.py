"""The Llama-style decoder: building blocks (`layers`), attention and its KV cache (`attention`),
and the assembled `Transformer` with its spec, parameter count and FLOP model (`transformer`)."""
