"""mdgru-keras: anatomical landmark localization with strided MD-GRUs (Andermatt et al., 2017)."""

from setuptools import find_packages, setup

setup(
    name="mdgru-keras",
    version="0.1.0",
    description="Coarse-to-fine 3D landmark localization with multi-dimensional gated recurrent units",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["mdgru_keras", "mdgru_keras.*"]),
    include_package_data=True,
    package_data={
        # the presets (`--config cpu`), found next to mdgru_keras/config.py
        "mdgru_keras": ["configs/*.yaml"],
        # the shipped pretrained model(s): mdgru_keras/pretrained/NAME/{manifest.json,saved_model/...}
        "mdgru_keras.pretrained": ["*/manifest.json", "*/saved_model/*", "*/saved_model/**/*"],
    },
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "numpy>=1.26,<3",
        "nibabel>=5.2,<6",
        "scikit-image>=0.24,<0.27",
        "scipy>=1.13,<2",
        "click>=8.1,<9",
        "PyYAML>=6,<7",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "Pillow>=10.1,<14",
        "SimpleITK>=2.4,<3",
        "tensorflow-serving-api>=2.21,<2.22",
        "grpcio>=1.60,<2",
        "requests>=2.31,<3",
        # the BIDS app (`mdgru-localize bids`) finds a dataset's scans with it; imported only by that command
        "pybids>=0.22,<0.23",
    ],
    extras_require={
        # the deformable atlas-registration baseline (`evaluate --baseline ants`); antspyx 0.6 pins numpy < 2.4
        # and scipy < 1.16, so installing it may downgrade those two
        "ants": ["antspyx>=0.6,<0.7"],
        # the cohort workflow (workflow/Snakefile: the BIDS app over a cohort, on one machine or a cluster)
        "workflow": ["snakemake>=9,<10"],
        "dev": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "pytest-xdist>=3.6,<4",
            "hypothesis>=6.100,<7",
            "ruff>=0.6,<1",
            # drives Debian's Chromium in the QC-report test (tests/test_reports.py; `make browser` installs it)
            "selenium>=4.20,<5",
            # tests/test_workflow.py runs the cohort workflow
            "snakemake>=9,<10",
        ],
    },
    entry_points={"console_scripts": ["mdgru-localize=mdgru_keras.cli:main"]},
)
