"""What a benchmark result was measured on: the trainer's :func:`tritonbn.train.environment`
(device, GPU name and SM count, CUDA runtime, cuDNN, NVIDIA driver, library versions), so that
results and training runs describe their machine with one implementation."""

from tritonbn.train import environment

__all__ = ["environment"]
