from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

TEST = ["pytest>=7.0", "hypothesis>=6.0"]
EXPERIMENTS = ["scikit-learn>=1.0", "matplotlib>=3.5"]

setup(
    name="torchpruner",
    version="0.1.0",
    description="On-the-fly structured pruning for PyTorch: attribution metrics and real slicing "
    "of layers, consumers and live training state.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torchpruner", "torchpruner.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.23",
        "captum>=0.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": TEST + EXPERIMENTS,
        "experiments": EXPERIMENTS,
        "dev": TEST + EXPERIMENTS,
    },
    license="MIT",
)
