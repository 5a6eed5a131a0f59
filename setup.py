"""Package definition for megatron-elastic (``pip install -e .``; extras: ``gpu``, ``test``)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "megatron_elastic" / "version.py").read_text()).group(1)

setup(
    name="megatron-elastic",
    version=VERSION,
    description="Elastic nested hybrid Mamba-2/attention language models: train once, extract many budgets",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_elastic", "megatron_elastic.*"]),
    install_requires=[
        # The README's setup installs torch==2.13.0 first (a CPU build); this range then adds nothing.
        "torch>=2.5",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "transformers>=5.0,<6",
        "tokenizers>=0.20",
        # Megatron indexed datasets (written with megatron-core's own builder); 0.16.x is the line
        # that installs on Python 3.11.
        "megatron-core>=0.16.1,<0.17",
        # megatron-core's dist_checkpointing writer processes report through psutil.
        "psutil>=5.9",
        "numpy>=1.24",
        "pyyaml>=6.0",
    ],
    extras_require={
        # CUDA-only kernels; install with --no-build-isolation on a machine with CUDA and torch.
        "gpu": ["mamba-ssm>=2.2", "causal-conv1d>=1.4", "transformer-engine[pytorch]>=2.0"],
        "mlflow": ["mlflow>=3.0,<4", "matplotlib>=3.7"],
        "slurm": ["submitit>=1.5"],
        # Post-training quantization of extracted budgets (calibration runs on CPU; NVFP4 needs CUDA).
        "deploy": ["nvidia-modelopt>=0.40"],
        "test": ["pytest>=8", "transformers==5.24.0", "mlflow==3.17.2", "matplotlib==3.11.2", "submitit==1.5.4",
                 "nvidia-modelopt==0.47.0"],
    },
    entry_points={"console_scripts": ["megatron-elastic=megatron_elastic.cli:main"]},
)
