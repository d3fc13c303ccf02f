"""Training: LoRA/DoRA adapters (``adapters.py``), datasets (``data.py``) and the one training loop
(``loop.py``) that fine-tuning and distillation share."""
