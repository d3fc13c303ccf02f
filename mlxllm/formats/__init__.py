"""Model files in, models out: GGUF and Hugging Face / mlx-community readers, the Hub, the loader
(``mlxllm.load``) and the mlx-community writer."""
