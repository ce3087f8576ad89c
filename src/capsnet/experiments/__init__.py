"""The papers' experiments on trained models: each writes a JSON record and PNG figures.

=====================  ===============================================================
function               claim tested (file)
=====================  ===============================================================
attack_experiment      capsules resist white-box FGSM / BIM better than a CNN ([H18] §6;
                       adversarial.py); attack_seeds_experiment: the same over seeds
transform_sweep        accuracy vs rotation / translation / scale outside training range
                       (sweeps.py)
affnist_experiment     trained on shifted MNIST, tested on affine digits ([S17] §5.2;
                       affnist.py)
viewpoint_experiment   smallNORB novel azimuths / elevations ([H18] §5.2; viewpoint.py,
                       through the matched-error protocol of generalization.py)
reconstruction_...     reconstructions and pose-dimension perturbations ([S17] Fig. 3-4;
                       reconstruction.py)
routing_experiment     routing finds agreement: per-iteration couplings, vote-distance
                       histograms ([H18] Fig. 2), dead capsules (routing.py)
equivariance_...       f(Tx) ≈ M_T f(x): a linear-map residual for known transforms T
                       (equivariance.py)
seed_comparison        test error over training seeds with intervals, paired against a
                       baseline's seeds (seeds.py)
=====================  ===============================================================

Every function takes already-built models (``{label: nn.Module}``) and datasets that follow
the :class:`capsnet.data.ImageDataset` contract (``images`` uint8 ``(N, C, H, W)``,
``labels``, ``classes``, ``num_classes``, ``eval_transform``), writes
``<out_dir>/<experiment>.json`` plus PNGs and returns the record (a plain-typed dict,
see :func:`make_record`, records.py). :mod:`capsnet.report` turns the records of a run
into a page. The protocols (:func:`generalization_protocol` and its instances) take run
configs instead and train the models through :func:`capsnet.train.train`.

Images: attacks perturb the *stored* image in [0, 1] and the model sees
``eval_transform(x)``; geometric transforms are applied to the model input
(``T(eval_transform(x))``) so a 28x28 digit padded onto a 40x40 canvas rotates without
clipping (evaluation.py).

Imports go one way: records.py, then evaluation.py, then the experiments;
generalization.py below viewpoint.py and affnist.py.
"""

from __future__ import annotations

from capsnet.devices import resolve_device as resolve_device
from capsnet.experiments.adversarial import attack_experiment, attack_seeds_experiment
from capsnet.experiments.affnist import affine_test_set, affnist_experiment, affnist_protocol
from capsnet.experiments.equivariance import equivariance_experiment
from capsnet.experiments.evaluation import Progress as Progress
from capsnet.experiments.evaluation import class_names as class_names
from capsnet.experiments.evaluation import eval_batches, evaluate_accuracy
from capsnet.experiments.evaluation import preprocess_of as preprocess_of
from capsnet.experiments.generalization import generalization_protocol, matched_checkpoints
from capsnet.experiments.reconstruction import reconstruction_experiment
from capsnet.experiments.records import make_record, write_json
from capsnet.experiments.routing import routing_experiment
from capsnet.experiments.seeds import seed_comparison
from capsnet.experiments.sweeps import transform_sweep
from capsnet.experiments.viewpoint import PAPER_VIEWPOINTS as PAPER_VIEWPOINTS
from capsnet.experiments.viewpoint import viewpoint_experiment
from capsnet.experiments.viewpoint_equivariance import (
    azimuth_pairs,
    viewpoint_equivariance_experiment,
)

__all__ = [
    "azimuth_pairs",
    "viewpoint_equivariance_experiment",
    "make_record",
    "write_json",
    "eval_batches",
    "evaluate_accuracy",
    "attack_experiment",
    "attack_seeds_experiment",
    "transform_sweep",
    "reconstruction_experiment",
    "routing_experiment",
    "seed_comparison",
    "equivariance_experiment",
    "affine_test_set",
    "affnist_experiment",
    "matched_checkpoints",
    "generalization_protocol",
    "viewpoint_experiment",
    "affnist_protocol",
]
