from setuptools import find_packages, setup

setup(
    name="specdec",
    version="0.1.0",
    description="Low-latency LLM server in pure PyTorch with exact speculative decoding",
    packages=find_packages(include=["specdec", "specdec.*", "server", "server.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "safetensors",
        "aiohttp>=3.9",
        "orjson",
        "structlog",
        "prometheus-client",
        "tqdm",
        "gguf",
        "accelerate",
        "numpy",
        "xxhash",
    ],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "dev": ["pytest", "hypothesis", "openai>=1.0", "matplotlib"],
    },
    entry_points={"console_scripts": ["specdec=specdec.cli:main"]},
)
