"""Segmentation (UNet on PascalVOC) and image synthesis (SPADE on Cityscapes): the paper's Fig. 7 and Table 3, and
their reduced versions on scenes of digits."""

from __future__ import annotations

from cdgrad.experiments.presets.base import Preset, grid
from cdgrad.experiments.presets.paper import TABLE2_METHODS

# The channel-directed paper's other two tasks (its Fig. 7 and Table 3); the settings are the paper's Table 1.
# The paper gives optimiser, lr, batch and epochs; the rest (schedule, crop, momentum of the UNet run) is ours.
DENSE_HEADLINE_SEG = (
    "PascalVOC 2012, UNet (ResNet-50 encoder), SGD lr 7e-3, batch 2, 70 epochs, 3 trials: H1~ and H0 give about "
    "8% higher segmentation accuracy than SGD and a smaller generalisation gap (Fig. 7; numbers read off a plot)"
)
DENSE_HEADLINE_GAN = (
    "Cityscapes, SPADE, SGD momentum 0.9, weight decay 5e-4, lr 1e-4 (G) / 4e-4 (D), batch 2, 24 models per "
    "optimizer: H1~ and H0 give a lower mean FID and a smaller FID spread than SGD (Table 3)"
)
SEG_VOC = {
    "task": "segmentation",
    "dataset": "voc2012",
    "model": "unet-resnet50",
    "optimizer": "sgd",
    "lr": 7e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 2,
    "epochs": 70,
    "schedule": "constant",
    "augment": True,
    "crop": 320,
    "eval_every": 5,
    "eval_batch_size": 4,
    "save_model": True,
}
SPADE_CITYSCAPES = {
    "task": "synthesis",
    "dataset": "cityscapes",
    "model": "spade",
    "optimizer": "sgd",
    "lr": 1e-4,
    "lr_d": 4e-4,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 2,
    "epochs": 200,
    "schedule": "constant",
    "eval_every": 20,
    "eval_batch_size": 8,
    "fid_extractor": "inception",
    "save_model": True,
}
SEG_REDUCED = {
    **SEG_VOC,
    "dataset": "fashion-mnist-scenes",
    "model": "unet-small",
    "lr": 0.05,
    "batch_size": 32,
    "epochs": 6,
    "augment": False,
    "crop": 0,
    "eval_every": 2,
    "eval_batch_size": 250,
}
SPADE_REDUCED = {
    **SPADE_CITYSCAPES,
    "dataset": "fashion-mnist-scenes",
    "model": "spade-small",
    "lr": 1e-3,
    "lr_d": 4e-3,
    "batch_size": 16,
    "train_subset": 2000,
    "epochs": 2,
    "eval_every": 1,
    "eval_batch_size": 250,
    "fid_extractor": "classifier",
}
PRESETS = (
    Preset(
        "seg-voc",
        "Fig. 7: semantic segmentation, PascalVOC 2012, UNet with a ResNet-50 encoder; SGD vs H1~ vs H0",
        SEG_VOC,
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist", "samples"),
        published=DENSE_HEADLINE_SEG,
    ),
    Preset(
        "seg-reduced",
        "Fig. 7 reduced: segmentation of Fashion-MNIST scenes (64x64, 11 classes), small UNet; SGD vs H1~ vs H0",
        SEG_REDUCED,
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist", "samples"),
        cuts="scenes of 2-4 Fashion-MNIST images with per-pixel masks (6,000 training, 1,000 test scenes) instead "
        "of PascalVOC, a small UNet instead of ResNet-50, batch 32 and lr 0.05 instead of 2 and 7e-3, 6 epochs "
        "instead of 70, no augmentation; about 25 minutes on 2 CPU cores",
        published=DENSE_HEADLINE_SEG,
    ),
    Preset(
        "spade-cityscapes",
        "Table 3: image synthesis, Cityscapes label maps to images, SPADE, FID over 24 models per optimizer",
        SPADE_CITYSCAPES,
        grid([{}], TABLE2_METHODS, 24),
        plots=("curves", "hist", "samples"),
        published=DENSE_HEADLINE_GAN,
    ),
    Preset(
        "spade-reduced",
        "Table 3 reduced: Fashion-MNIST scene label maps to images, small SPADE, FID in a scene classifier's "
        "features; SGD vs H1~ vs H0",
        SPADE_REDUCED,
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist", "samples"),
        cuts="Fashion-MNIST scenes (64x64, 11 classes) instead of Cityscapes, a small SPADE, 2,000 training scenes, "
        "batch 16, lr 1e-3 / 4e-3 instead of 1e-4 / 4e-4 (ten times the paper's, for a run of 250 steps), 2 epochs, "
        "FID over the 1,000 test scenes in the features of a small classifier trained on the scenes instead of "
        "Inception, 3 seeds instead of 24; about 35 minutes on 2 CPU cores",
        published=DENSE_HEADLINE_GAN,
    ),
)
