"""Synthetic short-axis cine MRI phantom in the ACDC layout.

The phantom lets the whole pipeline run (and its tests pass) without the real ACDC data. Each patient
is a short-axis stack from base (slice 0) to apex (last slice) at end-diastole (ED, frame 01) and
end-systole (ES), written as ACDC writes it::

    DIR/patientNNN/patientNNN_frame01.nii.gz      ED image   (X, Y, Z) int16
    DIR/patientNNN/patientNNN_frame01_gt.nii.gz   ED labels  (X, Y, Z) uint8
    DIR/patientNNN/patientNNN_frameEE.nii.gz      ES image, EE = the ES frame number of Info.cfg
    DIR/patientNNN/patientNNN_frameEE_gt.nii.gz   ES labels
    DIR/patientNNN/Info.cfg                       ED, ES, Group, Height, Weight, NbFrame
    DIR/truth.json                                volumes, ejection fractions, mass built per patient

Labels follow ACDC: 0 background, 1 right-ventricle (RV) cavity, 2 left-ventricle (LV) myocardium,
3 LV cavity (papillary muscles included, as in ACDC).

Geometry. Square pixels of 1.2 to 1.8 mm (a field of view of 320 to 380 mm over the longer image
side), 8 to 12 slices 5 to 10 mm apart, stored in the affine, pixdim, qform and sform (codes 1).

Anatomy model (lengths in mm, z measured from the base plane towards the apex):

- LV: a truncated prolate ellipsoid. Radii follow ``R * sqrt(1 - w(z)**2)`` with
  ``w(z) = (z + 0.15 L) / 1.15 L``, so the ventricle is widest at the base and closes at the apex ``L``
  (just beyond the last slice); the endocardium closes ``~0.8 * thickness`` before the epicardium,
  leaving a myocardial cap. In-plane the outline has a small random ellipticity and third
  harmonic. Wall thickness 7 to 10 mm (NOR); two papillary muscles sit against the lateral wall.
- RV: an ellipse centred on the septal side (radial semi-axis ``~R_epi``, tangential ``~1.2 R_epi``)
  minus the LV epicardial disc, which gives the crescent; it tapers as ``sqrt(1 - (z / L_rv)**2)``
  with ``L_rv`` short of the last slice, so the apical slices hold no RV. A 2.5 to 4 mm free wall and
  patchy epicardial fat surround the heart.
- Systole: the LV cavity area of every angular sector shrinks by ``f = 1 - EF`` (per sector, so an
  infarcted sector can stay akinetic); the epicardial radius follows from keeping the myocardial area
  of every sector, ``r_epi_es**2 = r_endo_es**2 + r_epi_ed**2 - r_endo_ed**2``, so the wall
  thickens and the myocardial volume is preserved. The RV ellipse shrinks (radial axis ``k``,
  tangential ``k**0.35``) with ``k`` found by bisection so that the RV volume falls by the drawn RV
  EF. Slices do not move through-plane.
- Groups (assigned round-robin, so each is balanced): NOR normal (LV EF ~ 55-70 %); DCM dilated LV
  (endocardial radius 30-37 mm), thin wall, EF < 40 %; HCM small cavity, wall 17-22 mm, EF > 70 %;
  MINF a 70-120 degree sector thinned to 3-5 mm and akinetic, EF < 45 %; RV dilated RV (x1.35-1.6)
  with RV EF 20-40 %.
- Surroundings: an irregular body ellipse with subcutaneous fat and chest-wall muscle, dark lungs
  with vessel speckle, a liver (an ellipsoid that grows towards the apex), descending aorta, a
  vertebra, and 6 to 13 small vessels and fat pads.
- Placement: the heart is rotated at random (RV at 180 +- ~20 degrees in the image, as in ACDC) and
  placed at random so that it stays inside the central 60 % of the field of view.

Image formation: tissue classes get bSSFP-like intensities (blood 1, myocardium 0.25-0.4, fat
0.8-1.1, liver 0.35-0.5, lung 0.03-0.08, air 0), times a smooth texture; through-plane partial
volume averages three sub-slices per slice; in-plane blur (Gaussian, sigma 0.6-0.9 px) models the
point-spread function; a smooth multiplicative coil bias field; Rician noise (magnitude of complex
Gaussian noise, sigma 2-5 % of blood); scaled to scanner-like int16 (blood ~ 250-600).

Determinism: patient ``k`` is drawn from ``numpy.random.default_rng([seed, k])`` and so does not
depend on how many patients are generated; the gzip streams are written with ``mtime=0`` and no
file name, so the same seed gives byte-identical files.

Command line::

    python -m seg_densenet.data.synthetic --out data/synthetic --patients 40 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from seg_densenet.errors import DataError, SegDenseNetError
from seg_densenet.evaluation.clinical import (
    MYOCARDIUM_DENSITY_G_PER_ML,
    indices_from_volumes,
    structure_volumes_ml,
)

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")
DEFAULT_IMAGE_SIZE = (216, 256)
COMPLETE_MARKER = ".complete"
# bump when the generated data change, so that ensure_dataset regenerates old copies
FORMAT_VERSION = 1

# tissue classes of the phantom; the first four are the ACDC labels
_AIR, _RV, _MYO, _LV, _RV_WALL, _PAPILLARY, _FAT, _MUSCLE, _LUNG, _LIVER, _SOFT, _VESSEL, _BONE = range(13)
_N_TISSUES = 13
_TISSUE_TO_LABEL = np.array([0, 1, 2, 3, 0, 3, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
_SUBSLICES = np.array([-1.0, 0.0, 1.0]) / 3.0  # through-plane partial volume: offsets in slices

# group priors: uniform ranges (low, high)
#   r_endo: LV endocardial radius at the equator (mm); thick: wall thickness (mm);
#   ef: target LV ejection fraction; rv_scale: RV size relative to a normal RV; rv_ef: target RV EF;
#   length: LV long axis base to apex (mm)
_PRIORS = {
    "NOR": dict(r_endo=(24, 28), thick=(7.5, 10), ef=(0.58, 0.68), rv_scale=(0.95, 1.1), rv_ef=(0.5, 0.62),
                length=(85, 100)),
    "DCM": dict(r_endo=(31, 37), thick=(6, 8), ef=(0.15, 0.33), rv_scale=(1.0, 1.2), rv_ef=(0.3, 0.5),
                length=(100, 115)),
    "HCM": dict(r_endo=(19, 23), thick=(17, 22), ef=(0.7, 0.8), rv_scale=(0.85, 1.0), rv_ef=(0.5, 0.65),
                length=(75, 90)),
    "MINF": dict(r_endo=(27, 32), thick=(8, 10), ef=(0.25, 0.38), rv_scale=(0.95, 1.15), rv_ef=(0.4, 0.55),
                 length=(90, 105)),
    "RV": dict(r_endo=(23, 27), thick=(7, 9.5), ef=(0.52, 0.65), rv_scale=(1.35, 1.6), rv_ef=(0.2, 0.38),
               length=(85, 100)),
}  # fmt: skip


@dataclass(frozen=True)
class _Patient:
    """Parameters drawn for one patient (lengths in mm, angles in rad, intensities relative to blood)."""

    group: str
    shape: tuple[int, int, int]  # (X, Y, Z)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    nb_frame: int
    es_frame: int
    height: float  # cm
    weight: float  # kg
    # heart placement: LV centre relative to the FOV centre, patient rotation, heart's own rotation
    center: tuple[float, float]
    psi: float
    delta: float
    # LV
    r_endo: float
    r_epi: float
    l_epi: float  # epicardial apex, mm from the base plane
    l_endo: float
    ellipticity: float
    ellipse_angle: float
    harmonic3: float
    harmonic3_angle: float
    ef: float
    # MINF infarct: centre angle, half width, thinning depth (0 = none), onset along z, akinesia
    infarct_angle: float
    infarct_half_width: float
    infarct_depth: float
    infarct_z0: float
    akinesia: float
    # papillary muscles
    papillary_radius: float
    papillary_angles: tuple[float, float]
    # RV ellipse (at the base): centre distance as a fraction of R_epi, semi-axes, apex, wall
    rv_offset: float
    rv_radial: float
    rv_tangential: float
    l_rv: float
    rv_wall: float
    rv_ef: float
    fat: float
    fat_angle: float
    # surroundings in the patient frame (origin at the LV centre)
    body: tuple[float, ...]  # see _blob
    body_fat: float
    body_muscle: float
    lungs: tuple[tuple[float, ...], ...]
    blobs: tuple[tuple[float, float, float, float, float, int], ...]  # p, q, z, radius, z semi-axis, tissue
    liver: tuple[float, float, float, float, float]  # centre p, q, z, in-plane radius, z semi-axis
    aorta: tuple[float, float, float]  # centre p, q, radius
    vertebra: tuple[float, float, float]
    # image formation
    intensities: tuple[float, ...]  # per tissue class, blood = 1
    blur_sigma: float  # px
    bias: tuple[float, ...]
    noise_sigma: float  # relative to blood
    blood_level: float  # int16 scanner units of blood


def _u(rng: np.random.Generator, low_high: tuple[float, float]) -> float:
    return float(rng.uniform(*low_high))


def _sample_patient(rng: np.random.Generator, group: str, image_size: tuple[int, int]) -> _Patient:
    """Draw every parameter of one patient; the order of draws is part of the output format:
    the heart, its surroundings, the tissue intensities, then the remaining details."""
    prior = _PRIORS[group]
    heart = _sample_heart(rng, group, prior, image_size)
    surroundings = _sample_surroundings(rng, heart["l_epi"])
    intensities = _sample_intensities(rng)
    return _Patient(
        group=group, **heart, **surroundings, intensities=intensities, **_sample_details(rng, prior)
    )


def _sample_heart(rng: np.random.Generator, group: str, prior: dict, image_size: tuple[int, int]) -> dict:
    """The grid, the LV and RV geometry, the infarct and the heart's place in the field of view."""
    nx, ny = image_size
    spacing = float(np.clip(rng.uniform(320.0, 380.0) / max(nx, ny), 1.2, 1.8))
    length = _u(rng, prior["length"])
    n_slices = int(np.clip(round(length / rng.uniform(7.0, 10.0)), 8, 12))
    dz = float(np.clip(round(length / (n_slices - 0.15), 1), 5.0, 10.0))
    # the epicardial apex lies 0.2 to 0.5 slices beyond the last slice centre: a small apical cap
    l_epi = (n_slices - 0.5 + rng.uniform(0.2, 0.5)) * dz

    r_endo = _u(rng, prior["r_endo"])
    thick = _u(rng, prior["thick"])
    r_epi = r_endo + thick
    ef = _u(rng, prior["ef"])

    infarct_depth, infarct_half_width, akinesia = 0.0, 0.5, 0.0
    infarct_angle = float(rng.uniform(0, 2 * math.pi))
    infarct_z0 = float(rng.uniform(0.1, 0.45)) * l_epi
    if group == "MINF":
        infarct_half_width = math.radians(rng.uniform(35, 60))
        infarct_depth = 1.0 - rng.uniform(3.0, 5.0) / thick
        akinesia = float(rng.uniform(0.85, 1.0))

    rv_scale = _u(rng, prior["rv_scale"])
    # the RV tapers to nothing 0.6 to 1.4 slices before the last slice centre
    l_rv = min((n_slices - 1.6 + rng.uniform(0.0, 0.8)) * dz, 0.9 * l_epi)

    psi = float(rng.normal(0.0, 0.2))
    delta = float(rng.normal(0.0, 0.25))
    rv_offset = float(rng.uniform(0.45, 0.55))
    rv_radial = float(rng.uniform(0.9, 1.0)) * rv_scale * r_epi
    rv_tangential = float(rng.uniform(1.12, 1.25)) * r_epi * (1 + 0.5 * (rv_scale - 1))
    rv_wall = float(rng.uniform(2.5, 4.0))
    fat = float(rng.uniform(2.0, 6.0))
    center = _place_heart(rng, (nx * spacing, ny * spacing), math.pi + psi + delta, r_epi, rv_offset * r_epi,
                          rv_radial, rv_tangential, rv_wall + fat)  # fmt: skip
    return {
        "shape": (nx, ny, n_slices), "spacing": (spacing, spacing, dz), "center": center, "psi": psi,
        "delta": delta, "r_endo": r_endo, "r_epi": r_epi, "l_epi": l_epi, "l_endo": l_epi - 0.8 * thick,
        "ef": ef, "infarct_angle": infarct_angle, "infarct_half_width": infarct_half_width,
        "infarct_depth": float(infarct_depth), "infarct_z0": infarct_z0, "akinesia": akinesia,
        "rv_offset": rv_offset, "rv_radial": rv_radial, "rv_tangential": rv_tangential, "l_rv": float(l_rv),
        "rv_wall": rv_wall, "fat": fat,
    }  # fmt: skip


def _sample_surroundings(rng: np.random.Generator, l_epi: float) -> dict:
    """Body outline, lungs, liver, aorta, vertebra, vessels and fat pads, in the patient frame (mm,
    origin at the LV centre, RV towards -p)."""
    body = _blob(rng, (-10, 30), (-10, 30), (175, 230), (125, 160), 0.1, 0.05)
    lungs = (
        _blob(rng, (45, 75), (-5, 35), (65, 90), (80, 110), 0.3, 0.1),  # beside the LV
        _blob(rng, (-115, -85), (0, 40), (50, 75), (75, 105), 0.3, 0.1),  # beyond the RV
    )
    liver = (
        float(rng.uniform(-60, -20)),
        float(rng.uniform(-95, -65)),
        l_epi + float(rng.uniform(-10, 20)),
        float(rng.uniform(75, 100)),
        float(rng.uniform(60, 90)),
    )
    aorta = (float(rng.uniform(35, 55)), float(rng.uniform(-70, -55)), float(rng.uniform(9, 13)))
    vertebra = (aorta[0] - float(rng.uniform(20, 30)), aorta[1] - float(rng.uniform(20, 28)), 17.0)
    # vessels and fat pads: ellipsoids (p, q, z, in-plane radius, z semi-axis, tissue)
    blobs = tuple(
        (
            float(rng.uniform(-130, 130)),
            float(rng.uniform(-100, 100)),
            float(rng.uniform(-20, l_epi + 20)),
            float(rng.uniform(3, 12)),
            float(rng.uniform(10, 60)),
            int(rng.choice([_VESSEL, _VESSEL, _FAT, _SOFT])),
        )
        for _ in range(int(rng.integers(6, 14)))
    )
    return {
        "body": body,
        "lungs": lungs,
        "liver": liver,
        "aorta": aorta,
        "vertebra": vertebra,
        "blobs": blobs,
    }


def _sample_intensities(rng: np.random.Generator) -> tuple[float, ...]:
    """Signal of each tissue class relative to blood (cine bSSFP: bright blood and fat, dark lung)."""
    intensities = np.zeros(_N_TISSUES)
    myo = rng.uniform(0.25, 0.4)
    intensities[[_LV, _RV, _VESSEL]] = 1.0, rng.uniform(0.85, 1.0), rng.uniform(0.95, 1.15)
    intensities[[_MYO, _RV_WALL, _PAPILLARY]] = myo, myo * 1.1, myo
    intensities[_FAT] = rng.uniform(0.8, 1.1)
    intensities[_MUSCLE] = rng.uniform(0.3, 0.45)
    intensities[_LUNG] = rng.uniform(0.03, 0.08)
    intensities[_LIVER] = rng.uniform(0.35, 0.5)
    intensities[_SOFT] = rng.uniform(0.3, 0.45)
    intensities[_BONE] = rng.uniform(0.35, 0.5)
    return tuple(float(v) for v in intensities)


def _sample_details(rng: np.random.Generator, prior: dict) -> dict:
    """Cine timing, body size, the outline's small irregularities, papillary muscles, RV function,
    fat and body layers, and image formation (blur, bias field, noise, scanner level), in draw order."""
    nb_frame = int(rng.choice([20, 25, 28, 30, 30, 30]))
    height = round(float(rng.uniform(155, 195)), 1)
    return {
        "nb_frame": nb_frame,
        "es_frame": int(round(nb_frame * rng.uniform(0.3, 0.45))) + 1,
        "height": height,
        "weight": round(float(rng.normal(25.0, 3.5)) * (height / 100) ** 2, 1),
        "ellipticity": float(rng.uniform(0.0, 0.06)),
        "ellipse_angle": float(rng.uniform(0, math.pi)),
        "harmonic3": float(rng.uniform(0.0, 0.025)),
        "harmonic3_angle": float(rng.uniform(0, 2 * math.pi)),
        "papillary_radius": float(rng.uniform(2.5, 4.0)),
        "papillary_angles": (math.pi - float(rng.uniform(0.6, 1.0)), math.pi + float(rng.uniform(0.6, 1.0))),
        "rv_ef": _u(rng, prior["rv_ef"]),
        "fat_angle": float(rng.uniform(0, 2 * math.pi)),
        "body_fat": float(rng.uniform(6, 18)),
        "body_muscle": float(rng.uniform(6, 12)),
        "blur_sigma": float(rng.uniform(0.6, 0.9)),
        "bias": tuple(float(v) for v in rng.normal(0.0, [0.3, 0.3, 0.15, 0.15, 0.1, 0.05])),
        "noise_sigma": float(rng.uniform(0.02, 0.05)),
        "blood_level": float(rng.uniform(250, 600)),
    }


def _blob(rng: np.random.Generator, p, q, a, b, angle_sd: float, wobble: float) -> tuple[float, ...]:
    """An irregular ellipse: centre ``(p, q)``, semi-axes ``(a, b)`` (mm), angle (rad), and the amplitude
    and phase of its 2nd and 3rd harmonic outline perturbations."""
    return (
        _u(rng, p), _u(rng, q), _u(rng, a), _u(rng, b), float(rng.normal(0, angle_sd)),
        float(rng.uniform(0, wobble)), float(rng.uniform(0, 2 * math.pi)),
        float(rng.uniform(0, wobble)), float(rng.uniform(0, 2 * math.pi)),
    )  # fmt: skip


def _place_heart(
    rng: np.random.Generator,
    fov: tuple[float, float],
    theta: float,
    r_epi: float,
    rv_distance: float,
    rv_radial: float,
    rv_tangential: float,
    margin: float,
) -> tuple[float, float]:
    """Draw the LV centre (mm from the FOV centre) so the heart stays in the central 60 % of the FOV.

    The heart outline (LV epicardium and RV ellipse, grown by ``margin``) is sampled at its basal, widest
    size and rotated by ``theta`` (direction of the RV from the LV); the centre is then uniform in the
    range that keeps that outline inside the crop, or the middle of the range if the heart is too big.
    """
    t = np.linspace(0, 2 * math.pi, 73)
    lv = np.stack([np.cos(t), np.sin(t)]) * (r_epi * 1.08 + margin)
    rv = np.stack([rv_distance + (rv_radial + margin) * np.cos(t), (rv_tangential + margin) * np.sin(t)])
    pts = np.concatenate([lv, rv], axis=1)
    c, s = math.cos(theta), math.sin(theta)
    xy = np.array([[c, -s], [s, c]]) @ pts
    center = []
    for axis in range(2):
        half = 0.3 * fov[axis]
        low, high = -half - xy[axis].min(), half - xy[axis].max()
        center.append(float(rng.uniform(low, high)) if low < high else 0.5 * (low + high))
    return center[0], center[1]


def _lv_radii(p: _Patient, phi: np.ndarray, z: np.ndarray, systole: bool) -> tuple[np.ndarray, np.ndarray]:
    """Endocardial and epicardial radius (mm) at polar angle ``phi`` and depth ``z``, broadcast.

    ``phi`` is measured in the heart frame (0 points to the RV), ``z`` in mm from the base plane. A
    radius <= 0 means the structure is absent at that depth.
    """
    shape = (
        1.0
        + p.ellipticity * np.cos(2 * (phi - p.ellipse_angle))
        + p.harmonic3 * np.cos(3 * (phi - p.harmonic3_angle))
    )
    epi = p.r_epi * _profile(z, p.l_epi) * shape
    endo = p.r_endo * _profile(z, p.l_endo) * shape
    w = _infarct_weight(p, phi, z)
    if p.infarct_depth > 0:
        # thin the wall from the inside (the infarct bulges), only where a cavity exists
        endo = np.where(endo > 0, epi - (epi - endo) * (1 - p.infarct_depth * w), endo)
    if systole:
        # cavity area per angular sector scales by f; the infarct sector stays (near) akinetic
        mean_w = p.akinesia * float(np.mean(_infarct_weight(p, np.linspace(-np.pi, np.pi, 90)[:, None],
                                                            np.linspace(0, p.l_endo, 30)[None, :])))  # fmt: skip
        f_remote = max((1 - p.ef - mean_w) / (1 - mean_w), 0.1)
        f = f_remote + (1 - f_remote) * p.akinesia * w
        endo_es = endo * np.sqrt(f)
        # keep the myocardial area of every sector: r_epi^2 - r_endo^2 is preserved
        epi = np.sqrt(np.maximum(epi, 0) ** 2 - np.maximum(endo, 0) ** 2 + np.maximum(endo_es, 0) ** 2) * (
            epi > 0
        )
        endo = endo_es
    return endo, epi


def _profile(z: np.ndarray, apex: float) -> np.ndarray:
    """Prolate-ellipsoid radius factor: ~1 near the base, 0 at and beyond ``apex`` (mm)."""
    w = (z + 0.15 * apex) / (1.15 * apex)
    return np.sqrt(np.clip(1 - w * w, 0, None))


def _infarct_weight(p: _Patient, phi: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Infarct extent in [0, 1]: a cosine-tapered sector from ``infarct_z0`` towards the apex."""
    if p.infarct_depth <= 0:
        return np.zeros(np.broadcast_shapes(np.shape(phi), np.shape(z)))
    d = np.abs((phi - p.infarct_angle + np.pi) % (2 * np.pi) - np.pi) / p.infarct_half_width
    in_sector = 0.5 * (1 + np.cos(np.pi * np.clip(d, 0, 1)))
    onset = np.clip((z - p.infarct_z0) / (0.15 * p.l_epi), 0, 1)
    return in_sector * onset


def _rv_ellipse(p: _Patient, z: np.ndarray, scale: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """RV ellipse at depths ``z``: centre distance along +u, radial and tangential semi-axes (mm), presence.

    The ellipse tapers as ``sqrt(1 - (z / l_rv)**2)``, follows the LV size for its centre, and is
    multiplied by ``scale`` = (radial, tangential) in systole.
    """
    g = np.sqrt(np.clip(1 - (z / p.l_rv) ** 2, 0, None))
    present = g > 0
    dist = p.rv_offset * p.r_epi * _profile(z, p.l_epi)
    radial = np.where(present, p.rv_radial * g * scale[0], 1e-3)
    tangential = np.where(present, p.rv_tangential * g * scale[1], 1e-3)
    return dist, radial, tangential, present


def _rv_scale(k: float) -> tuple[float, float]:
    # in systole the free wall moves in more than the ends of the crescent
    return k, k**0.35


def _rv_cavity(
    p: _Patient, u: np.ndarray, v: np.ndarray, z: np.ndarray, epi: np.ndarray, k: float
) -> np.ndarray:
    """RV cavity mask ``(n, m, len(z))``: inside the RV ellipse and outside the LV epicardium."""
    dist, radial, tangential, present = _rv_ellipse(p, z, _rv_scale(k))
    r = np.hypot(u, v)[..., None]
    du = u[..., None] - dist
    return ((du / radial) ** 2 + (v[..., None] / tangential) ** 2 < 1) & (r >= epi) & present


def _rv_systolic_k(p: _Patient, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> float:
    """RV shrink factor whose ES cavity volume is ``1 - rv_ef`` of the ED one (bisection on voxel counts).

    ``u``, ``v``: heart-frame grid ``(n, m)`` mm; ``z``: slice centres (mm).
    """
    phi = np.arctan2(v, u)[..., None]
    epi_ed = _lv_radii(p, phi, z[None, None, :], systole=False)[1]
    epi_es = _lv_radii(p, phi, z[None, None, :], systole=True)[1]
    target = (1 - p.rv_ef) * np.count_nonzero(_rv_cavity(p, u, v, z, epi_ed, 1.0))
    low, high = 0.2, 1.0
    for _ in range(9):
        k = 0.5 * (low + high)
        if np.count_nonzero(_rv_cavity(p, u, v, z, epi_es, k)) > target:
            high = k
        else:
            low = k
    return 0.5 * (low + high)


def _heart_tissue(
    p: _Patient, u: np.ndarray, v: np.ndarray, z: np.ndarray, systole: bool, rv_k: float
) -> np.ndarray:
    """Tissue classes of the heart region, ``(n, m, len(z))`` uint8, 0 where there is no heart.

    ``u``, ``v``: ``(n, m)`` heart-frame coordinates (mm, +u towards the RV); ``z``: depths (mm);
    ``rv_k``: RV shrink factor (1 at ED).
    """
    r = np.hypot(u, v)[..., None]
    phi = np.arctan2(v, u)[..., None]
    endo, epi = _lv_radii(p, phi, z[None, None, :], systole)
    outside_lv = r >= epi
    rv_cavity = _rv_cavity(p, u, v, z, epi, rv_k)

    # RV free wall and patchy epicardial fat: the RV ellipse grown by the wall, then by the fat
    dist, radial, tangential, present = _rv_ellipse(p, z, _rv_scale(rv_k))
    du, vv = u[..., None] - dist, v[..., None]
    grow = p.rv_wall
    rv_wall = ((du / (radial + grow)) ** 2 + (vv / (tangential + grow)) ** 2 < 1) & outside_lv & present
    grow = grow + p.fat * (0.5 + 0.5 * np.cos(phi - p.fat_angle))
    fat = ((du / (radial + grow)) ** 2 + (vv / (tangential + grow)) ** 2 < 1) & present
    fat &= np.cos(2 * (phi - p.fat_angle)) > -0.3  # patchy: fat in some sectors only
    fat |= r < epi + p.fat * np.clip(np.cos(phi - p.fat_angle - 1.5), 0, None) ** 2

    tissue = np.zeros(rv_cavity.shape, dtype=np.uint8)
    tissue[fat & outside_lv] = _FAT
    tissue[rv_wall] = _RV_WALL
    tissue[rv_cavity] = _RV
    tissue[~outside_lv] = _MYO
    cavity = r < endo
    tissue[cavity] = _LV

    # papillary muscles: discs against the lateral wall where the cavity is wide enough
    rp = p.papillary_radius
    for angle in p.papillary_angles:
        endo_at = _lv_radii(p, np.array(angle), z, systole)[0]
        dist_pm = np.where(endo_at > 3 * rp, endo_at - 1.3 * rp, -1e3)
        cu, cv = dist_pm * math.cos(angle), dist_pm * math.sin(angle)
        disc = (u[..., None] - cu) ** 2 + (v[..., None] - cv) ** 2 < rp * rp
        tissue[disc & cavity] = _PAPILLARY
    return tissue


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, a, b, angle=0.0, h2=0.0, ph2=0.0, h3=0.0, ph3=0.0):
    """Mask of an ellipse (centre, semi-axes, angle) whose outline is perturbed by 2nd/3rd harmonics."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    du, dv = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
    rho2 = du * du + dv * dv
    if h2 == 0 and h3 == 0:
        return rho2 < 1
    phi = np.arctan2(dv, du)
    return rho2 < (1 + h2 * np.cos(2 * (phi - ph2)) + h3 * np.cos(3 * (phi - ph3))) ** 2


@dataclass
class _Grid:
    """Pixel coordinates (mm) of one patient: patient frame ``(pp, qq)`` over the FOV, ``(X, Y)``, and
    heart frame ``(u, v)`` over the crop ``[i0:i1, j0:j1]`` that holds the heart."""

    pp: np.ndarray
    qq: np.ndarray
    u: np.ndarray
    v: np.ndarray
    crop: tuple[slice, slice]
    center: tuple[float, float]
    psi: float
    spacing: float

    def to_image(self, p: float, q: float) -> tuple[float, float]:
        """Patient-frame point (mm) to mm from the FOV centre."""
        c, s = math.cos(self.psi), math.sin(self.psi)
        return self.center[0] + p * c - q * s, self.center[1] + p * s + q * c


def _grid(p: _Patient) -> _Grid:
    nx, ny, _ = p.shape
    s = p.spacing[0]
    # float32 throughout: the tissue maps are the bulk of the work and need no more precision
    x = ((np.arange(nx) - (nx - 1) / 2) * s - p.center[0]).astype(np.float32)[:, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * s - p.center[1]).astype(np.float32)[None, :]
    c, si = math.cos(p.psi), math.sin(p.psi)
    pp, qq = x * c + y * si, -x * si + y * c
    reach = (
        max(p.r_epi * 1.1, p.rv_offset * p.r_epi + max(p.rv_radial, p.rv_tangential)) + p.rv_wall + p.fat + 4
    )
    i0, i1 = _crop(p.center[0], reach, s, nx)
    j0, j1 = _crop(p.center[1], reach, s, ny)
    xc, yc = x[i0:i1], y[:, j0:j1]
    theta = math.pi + p.psi + p.delta  # direction of the RV from the LV in the image
    c, si = math.cos(theta), math.sin(theta)
    return _Grid(
        pp=pp, qq=qq, u=xc * c + yc * si, v=-xc * si + yc * c, crop=(slice(i0, i1), slice(j0, j1)),
        center=p.center, psi=p.psi, spacing=s,
    )  # fmt: skip


def _crop(center_mm: float, reach_mm: float, spacing: float, n: int) -> tuple[int, int]:
    mid = (n - 1) / 2 + center_mm / spacing
    return max(int(mid - reach_mm / spacing), 0), min(int(mid + reach_mm / spacing) + 2, n)


def _torso(p: _Patient, g: _Grid, z: np.ndarray) -> np.ndarray:
    """Tissue classes around the heart at depths ``z``: ``(X, Y, len(z))`` uint8."""
    pp, qq = g.pp, g.qq
    torso = np.zeros(np.broadcast_shapes(pp.shape, qq.shape), dtype=np.uint8)
    bp, bq, ba, bb, *outline = p.body
    torso[_ellipse(pp, qq, bp, bq, ba, bb, *outline)] = _FAT
    d = p.body_fat
    torso[_ellipse(pp, qq, bp, bq, ba - d, bb - d, *outline)] = _MUSCLE
    d += p.body_muscle
    inner = _ellipse(pp, qq, bp, bq, ba - d, bb - d, *outline)
    torso[inner] = _SOFT
    for lung in p.lungs:
        torso[inner & _ellipse(pp, qq, *lung)] = _LUNG
    ap, aq, ar = p.aorta
    torso[_ellipse(pp, qq, ap, aq, ar + 2, ar + 2)] = _SOFT
    torso[_ellipse(pp, qq, ap, aq, ar, ar)] = _VESSEL
    vp, vq, vr = p.vertebra
    torso[_ellipse(pp, qq, vp, vq, vr, vr * 0.9)] = _BONE

    tissue = np.repeat(torso[:, :, None], len(z), axis=2)
    # liver: an ellipsoid below the heart whose section grows towards the apex
    lp, lq, lz, lr, lzr = p.liver
    lr_z = lr * np.sqrt(np.clip(1 - ((z - lz) / lzr) ** 2, 0, None))
    in_liver = ((pp - lp) ** 2 + (qq - lq) ** 2)[..., None] < (lr_z**2)[None, None, :]
    tissue[in_liver & inner[..., None]] = _LIVER
    # small ellipsoids (vessels, fat pads), drawn in a box around each for speed
    s = g.spacing
    for bp, bq, bz, br, bzr, kind in p.blobs:
        r_z = br * np.sqrt(np.clip(1 - ((z - bz) / bzr) ** 2, 0, None))
        if not r_z.any():
            continue
        x, y = g.to_image(bp, bq)
        i0, i1 = _crop(x, br, s, pp.shape[0])
        j0, j1 = _crop(y, br, s, qq.shape[1])
        box = (slice(i0, i1), slice(j0, j1))
        d2 = (pp[box] - bp) ** 2 + (qq[box] - bq) ** 2
        region = tissue[box]
        region[(d2[..., None] < r_z**2) & inner[box][..., None]] = kind
    return tissue


def _with_heart(
    p: _Patient, g: _Grid, torso: np.ndarray, z: np.ndarray, systole: bool, rv_k: float
) -> np.ndarray:
    """The torso tissue ``(X, Y, len(z))`` with the heart drawn in (a new array)."""
    tissue = torso.copy()
    heart = _heart_tissue(p, g.u, g.v, z, systole, rv_k)
    region = tissue[g.crop]
    region[heart > 0] = heart[heart > 0]
    return tissue


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cell: int) -> np.ndarray:
    """Smooth random field ``(X, Y, Z)`` float32 of standard deviation ~ 0.7, correlation ~ ``cell`` px.

    White noise on a coarse lattice, linearly interpolated (two gathers per axis: cheaper than
    ``ndimage.zoom`` and free of BLAS threading).
    """
    nx, ny, nz = shape
    coarse = rng.standard_normal((nx // cell + 2, ny // cell + 2, nz), dtype=np.float32)
    field = coarse
    for axis, n in ((0, nx), (1, ny)):
        pos = np.arange(n, dtype=np.float32) / cell
        i0 = pos.astype(np.intp)
        frac = (pos - i0).reshape((-1, 1) if axis == 0 else (1, -1))[..., None]
        field = np.take(field, i0, axis=axis) * (1 - frac) + np.take(field, i0 + 1, axis=axis) * frac
    return field


def _render(
    p: _Patient, rng: np.random.Generator, sub_tissue: np.ndarray, texture: np.ndarray, vessels: np.ndarray
) -> np.ndarray:
    """MR image ``(X, Y, Z)`` int16 from tissue classes at ``len(_SUBSLICES)`` sub-slices per slice.

    ``sub_tissue``: ``(X, Y, n_sub * Z)`` uint8, sub-slices of a slice adjacent; ``texture``:
    ``(X, Y, Z)`` multiplicative tissue texture (~1); ``vessels``: ``(X, Y, Z)`` signal added in the lungs.
    """
    nx, ny, nz = p.shape
    n_sub = len(_SUBSLICES)
    lut = np.asarray(p.intensities, dtype=np.float32)
    # through-plane partial volume: the mean signal of the sub-slices
    image = lut[sub_tissue[:, :, 0::n_sub]]
    for i in range(1, n_sub):
        image += lut[sub_tissue[:, :, i::n_sub]]
    image *= 1 / n_sub
    image *= texture
    lung = sub_tissue[:, :, n_sub // 2 :: n_sub] == _LUNG
    image[lung] += vessels[lung]
    image = ndimage.gaussian_filter(image, sigma=(p.blur_sigma, p.blur_sigma, 0), truncate=3.0)

    # smooth multiplicative coil sensitivity
    gx = np.linspace(-1, 1, nx, dtype=np.float32)[:, None]
    gy = np.linspace(-1, 1, ny, dtype=np.float32)[None, :]
    gz = np.linspace(-1, 1, nz, dtype=np.float32)
    b = p.bias
    bias = np.exp(b[0] * gx + b[1] * gy + b[2] * gx * gx + b[3] * gy * gy + b[4] * gx * gy)
    image *= bias[..., None] * np.exp(b[5] * gz)

    # Rician noise: magnitude of the complex signal with Gaussian noise on both channels
    noise = rng.standard_normal((2, nx, ny, nz), dtype=np.float32)
    noise *= p.noise_sigma
    image = np.hypot(image + noise[0], noise[1])
    return np.clip(np.round(image * p.blood_level), 0, 32767).astype(np.int16)


def _affine(p: _Patient) -> np.ndarray:
    """Voxel-to-world (mm): spacing on the diagonal, the volume centred on the origin."""
    zooms = np.asarray(p.spacing)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -(np.asarray(p.shape) - 1) / 2 * zooms
    return affine


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Write a .nii.gz whose bytes depend only on the data (gzip mtime 0, no file name)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # nibabel's own writer stamps the gzip header with the time and the file name
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return img


def _write_patient(folder: Path, name: str, p: _Patient, rng: np.random.Generator) -> dict:
    """Render and write one patient into ``folder``; returns its truth.json entry."""
    nz = p.shape[2]
    dz = p.spacing[2]
    centres = ((np.arange(nz) + 0.5) * dz).astype(np.float32)
    sub_z = (centres[:, None] + _SUBSLICES[None, :].astype(np.float32) * dz).ravel()
    centre_index = list(_SUBSLICES).index(0.0)
    fine, coarse = _smooth_noise(rng, p.shape, 2), _smooth_noise(rng, p.shape, 6)
    texture = 1 + 0.12 * coarse + 0.06 * fine
    vessels = 0.35 * np.clip(fine - 1.2, 0, None)  # sparse bright specks in the lungs
    grid = _grid(p)
    torso = _torso(p, grid, sub_z)
    rv_k_es = _rv_systolic_k(p, grid.u[::3, ::3], grid.v[::3, ::3], centres)
    affine = _affine(p)
    folder.mkdir(parents=True)
    volumes = {}
    for frame, systole in ((1, False), (p.es_frame, True)):
        sub_tissue = _with_heart(p, grid, torso, sub_z, systole, rv_k_es if systole else 1.0)
        labels = _TISSUE_TO_LABEL[sub_tissue[:, :, centre_index :: len(_SUBSLICES)]]
        image = _render(p, rng, sub_tissue, texture, vessels)
        _write_nifti(folder / f"{name}_frame{frame:02d}.nii.gz", image, affine)
        gt = _write_nifti(folder / f"{name}_frame{frame:02d}_gt.nii.gz", labels, affine)
        volumes[systole] = structure_volumes_ml(labels, gt.header.get_zooms()[:3])
    (folder / "Info.cfg").write_text(
        f"ED: 1\nES: {p.es_frame}\nGroup: {p.group}\nHeight: {p.height:.1f}\nWeight: {p.weight:.1f}\n"
        f"NbFrame: {p.nb_frame}\n"
    )
    ed, es = volumes[False], volumes[True]
    # the indices exactly as the evaluation computes them (seg_densenet/evaluation/clinical.py)
    indices = indices_from_volumes(ed, es)
    return {
        "group": p.group,
        "ED_frame": 1,
        "ES_frame": p.es_frame,
        **{k: round(v, 4) for k, v in indices.items()},
        "MYO_mass_ES_g": round(es["MYO"] * MYOCARDIUM_DENSITY_G_PER_ML, 4),
        "spacing_mm": [round(float(v), 4) for v in gt.header.get_zooms()[:3]],
    }


def _params(n_patients: int, seed: int, image_size: tuple[int, int]) -> dict:
    return {
        "generator": "seg_densenet.data.synthetic",
        "version": FORMAT_VERSION,
        "n_patients": int(n_patients),
        "seed": int(seed),
        "image_size": [int(v) for v in image_size],
    }


def _check_args(n_patients: int, image_size: tuple[int, int]) -> None:
    if int(n_patients) < 1:
        raise DataError(f"synthetic dataset: n_patients must be >= 1, got {n_patients}")
    if len(image_size) != 2 or min(image_size) < 64:
        raise DataError(
            f"synthetic dataset: image_size must be two sizes >= 64 pixels, got {tuple(image_size)}"
        )


def generate_dataset(
    out_dir: str | os.PathLike,
    n_patients: int,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
) -> Path:
    """Write ``n_patients`` synthetic patients (``patient001`` ...) in the ACDC layout into ``out_dir``.

    ``image_size``: in-plane array size ``(X, Y)`` in pixels; the pixel spacing is drawn so that the
    field of view is 320 to 380 mm (clipped to 1.2-1.8 mm pixels). The dataset is built in a hidden
    sibling folder and renamed onto ``out_dir`` once complete (``.complete`` is written last), so an
    interrupted run never leaves a dataset that looks complete. An existing synthetic dataset in
    ``out_dir`` is replaced; any other non-empty folder is refused. Returns ``out_dir``.
    """
    _check_args(n_patients, image_size)
    out_dir = Path(out_dir)
    params = _params(n_patients, seed, image_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(out_dir)
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is ordinary data
    try:
        truth = {}
        for index in range(1, int(n_patients) + 1):
            rng = np.random.default_rng([int(seed), index])
            group = GROUPS[(index - 1) % len(GROUPS)]
            name = f"patient{index:03d}"
            patient = _sample_patient(rng, group, tuple(int(v) for v in image_size))
            truth[name] = _write_patient(tmp / name, name, patient, rng)
        (tmp / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
        (tmp / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_dataset(
    out_dir: str | os.PathLike,
    n_patients: int,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
) -> Path:
    """Return ``out_dir``, generating the dataset first unless a complete one with these parameters exists."""
    _check_args(n_patients, image_size)
    out_dir = Path(out_dir)
    if _read_marker(out_dir) == _params(n_patients, seed, image_size):
        return out_dir
    return generate_dataset(out_dir, n_patients, seed=seed, image_size=image_size)


def _remove_stale_temporaries(out_dir: Path, age_s: float = 3600.0) -> None:
    """Delete build folders that killed runs left beside ``out_dir``; young ones may belong to a live run."""
    now = time.time()
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if stale.is_dir() and now - stale.stat().st_mtime > age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; cannot write the synthetic dataset there")
    if out_dir.is_dir() and any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        raise DataError(
            f"{out_dir}: folder is not empty and holds no synthetic dataset (no {COMPLETE_MARKER}); "
            "refusing to overwrite it"
        )


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` onto ``target``, replacing an empty or synthetic ``target``."""
    if target.is_dir():
        _check_replaceable(target)
        if _read_marker(target) is None:
            target.rmdir()  # empty
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(new, target)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(new, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seg_densenet.data.synthetic",
        description="Write a synthetic short-axis cine MRI dataset in the ACDC layout.",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (created; an old synthetic dataset is replaced)"
    )
    parser.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=list(DEFAULT_IMAGE_SIZE), metavar=("X", "Y"),
        help="in-plane array size in pixels (default 216 256)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        out = generate_dataset(args.out, args.patients, seed=args.seed, image_size=tuple(args.image_size))
    except SegDenseNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.patients} synthetic patients to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
