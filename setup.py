"""Packaging for the DiT-on-DeepSpeed training system.

Install torch first (the CPU or CUDA build your machine needs), then this project: a bare
``torch`` requirement would pull a multi-GB CUDA build on machines that want the CPU one.
"""
from setuptools import find_packages, setup

setup(
    name="dit-deepspeed",
    version="0.1.0",
    description="Distributed training of Diffusion Transformers (DiT) on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "models.*", "trainer", "trainer.*", "data_pipeline",
                                    "data_pipeline.*", "cluster", "cluster.*"]),
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.20",
        "webdataset>=0.2.86,<1.1",
        "fairscale>=0.4.13,<0.5",
        "wandb>=0.17,<0.32",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "tqdm>=4.66",
        "scikit-image>=0.22",   # ships the real photos of the embedded demo
        "matplotlib>=3.7",      # loss/throughput plots in reports
        "psutil>=5.9",
    ],
    extras_require={
        "vae": ["diffusers>=0.30,<0.43", "safetensors>=0.4"],
        "dev": ["pytest>=8.0", "diffusers>=0.30,<0.43", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "dit-train=trainer.main:main",
            "dit-encode=data_pipeline.encode:main",
            "dit-demo-data=data_pipeline.demo_data:main",
            "dit-sample=trainer.tools.sample:main",
            "dit-status=trainer.tools.status:main",
            "dit-plan=cluster.plan:main",
        ],
    },
)
