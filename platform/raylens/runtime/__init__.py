"""The Ray runtime shared by every pipeline: ``ray.init``, the CPU/GPU budget, the
``TorchTrainer`` launch, and the Ray Data ingest that feeds Train workers."""
