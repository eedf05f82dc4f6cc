"""Evaluation: sampling, image metrics (`metrics/`), hardware measurements (`hardware`), tables and figures (`report`).

Submodules are imported on use (`from diffptq.eval.metrics import compute_image_metrics`) so that importing one does
not pull in torchmetrics or transformers for the others.
"""
