"""Config-file driven pipeline runs: `python -m pipelines configs/X.py [key=value ...]`.

corpus -> tokenizer -> tokens -> plan -> train -> evaluate -> sample -> report, each stage
fingerprinted and recorded in the run dir, so a rerun does only what is missing or out of date.
"""
