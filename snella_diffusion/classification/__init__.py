"""ViT image classification pieces for the paper-parity entry (train_classification_snella.py).

- ``data``: VTAB-1k, FGVC/VPT json and class-per-folder layouts; PIL/numpy/torch transforms.
- ``digits``: the embedded default (scikit-learn's handwritten digits, upscaled).
- ``methods``: snella / snell / lora / full / linear / masked_sparse set up on one model.
- ``paper``: the paper's per-dataset SNELLA settings and published accuracies.
- ``report``: results.json and the markdown comparison table.
"""
