"""mmreason: efficient multimodal reasoning — grid-world data, VLM fine-tuning, compressed KV decoding.

The library is importable and usable without a running Ray cluster; Ray appears only in
`pipelines/` and `jobs/`.
"""

__version__ = "0.1.0"
