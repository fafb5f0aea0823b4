from setuptools import find_packages, setup

setup(
    name="route",
    version="0.1.0",
    description="A small from-scratch PyTorch implementation of ROUTE (ICLR 2025): multitask tuning "
    "and collaboration prompting for Text-to-SQL",
    packages=find_packages(include=["route", "route.*"]),
    py_modules=["train", "infer"],
    python_requires=">=3.10",
    # torch's range is wide on purpose: users bring their own (CUDA) build. The floor is the first release with
    # everything route/ calls: torch.get_autocast_dtype (2.4), SDPA's enable_gqa (2.5), and FSDP2's public
    # torch.distributed.fsdp.fully_shard (2.6; only multi-process --full / --fsdp training, but the tests run it).
    install_requires=[
        "torch>=2.6",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sqlglot>=25",
        "numpy",
        "tqdm",
        "gguf>=0.17.1",  # ReaderField.contents(), no sentencepiece needed
    ],
    extras_require={
        # references the tests and benchmarks compare against; never imported by route/ itself
        "test": ["pytest", "transformers>=4.45", "jinja2", "peft", "accelerate"],
    },
    include_package_data=True,
)
