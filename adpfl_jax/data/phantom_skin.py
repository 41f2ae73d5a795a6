"""Built-in in-memory synthetic dermoscopy federation (the default data of `adpfl_jax`).

Every client ("site") is a simulated dermoscopy clinic with its own scanner and patient mix, in
the spirit of the four HAM10000 acquisition sources (docs/datasets.md §1.3, §6.3):

* **Scene.** Textured skin (skin tone varying per patient, low-frequency luminance and redness
  variation plus fine pore-like noise), one irregular star-convex lesion per image whose radius is
  a Fourier series r(θ) = r0·(1 + Σ_i a_i cos(iθ + φ_i)) (harmonics 2–6) blended in through a
  sigmoid (fuzzy border), with internal pigment variation (darker centre, dark patches, mottling,
  sometimes a pale blue-white regression area), and thin dark hair curves drawn over skin and
  lesion alike.
* **Scanner.** Per-site uneven illumination, vignetting, Gaussian blur, colour cast (channel
  gains), brightness, contrast and sensor noise.
* **Non-IID label distribution.** Per-site lesion-size distributions (site 0 small lesions,
  site 3 large ones; mean lesion area ≈ 13 %, 21 %, 28 %, 39 % of the image), skin-tone mix,
  lesion darkness, regression frequency, hair density and border irregularity.

Difficulty (measured at 32 × 32, seed 0): a per-site per-pixel logistic regression on RGB
reaches test Dice ≈ 0.84–0.92 (≈ 0.77 on site 0 when one model is fitted to all sites), while a
2-level U-Net with 8 base channels (GroupNorm) trained with SGD + momentum on the pooled
4 × 256 images for 300 steps of batch 32 reaches ≈ 0.97–0.98 on every site.

The mask is the lesion region *before* fuzzy blending: pixel centres where ρ < r(θ), i.e. where the
sigmoid blob function is > 0.5. Hairs are not part of the mask.

Sites 0–3 have fixed hand-made designs (``source_like`` names the HAM10000 source each loosely
imitates); sites ≥ 4 draw their design from ``(seed, site)``. ``heterogeneity`` scales every site's
deviation from a shared nominal design: 0 gives IID sites, 1 the designed spread, > 1 exaggerates
it (clipped to valid ranges).

Images are normalised per channel with the fixed constants :data:`PIXEL_MEAN` and
:data:`PIXEL_STD` (never with data statistics, so site colour differences survive
normalisation); :func:`to_rgb` undoes it.

Randomness: client ``k``'s site design, training split and test split each use their own
``np.random.SeedSequence(seed, spawn_key=(k, stream))`` — the same keys
``SeedSequence(seed).spawn`` would produce — so a client's data depends only on ``seed``, ``k``, its
own example count, ``image_size`` and ``heterogeneity``; never on the number or sizes of the other
clients. The test split does not depend on the training-split size either. Within a split,
examples are rendered in vectorised chunks of 128, each with its own generator spawned from the
split's seed sequence.

Example:

>>> fed = make_federation(num_clients=2, examples_per_client=[8, 4], test_examples_per_client=2,
...                       image_size=16)
>>> [x.shape for x in fed['train_x']], fed['train_y'][1].dtype, fed['client_names']
([(8, 16, 16, 3), (4, 16, 16, 3)], dtype('uint8'), ['site_0', 'site_1'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import numbers
from typing import Any

import numpy as np
from scipy import ndimage

# Fixed per-channel normalisation constants (RGB in [0, 1]). Chosen once as the rounded colour
# statistics of the nominal (heterogeneity=0) phantom; they are part of the public contract and
# must never be replaced by statistics of generated data.
PIXEL_MEAN = (0.71, 0.55, 0.47)
PIXEL_STD = (0.21, 0.18, 0.16)

# Stream ids used as the second element of each SeedSequence spawn key.
_SITE_STREAM = 0
_TRAIN_STREAM = 1
_TEST_STREAM = 2

# Examples generated together in one vectorised chunk (bounds peak memory for large images).
_CHUNK = 128
_MAX_HAIRS = 6
_HAIR_SEGMENTS = 8
_MAX_PATCHES = 3
_HARMONICS = np.arange(2, 7)
_TEXTURE_WAVES = 4

# Skin colour endpoints (linear interpolation by a per-patient tone in [0, 1]).
_SKIN_LIGHT = np.array([0.95, 0.80, 0.71], np.float32)
_SKIN_DARK = np.array([0.70, 0.50, 0.38], np.float32)

# Nominal design shared by all sites at heterogeneity=0. Scalars and 3-vectors only.
_NOMINAL: dict[str, Any] = {
    'lesion_radius_mean': 0.54,  # In units of the image half-width; area fraction ≈ π r² / 4.
    'lesion_radius_log_std': 0.15,
    'border_irregularity': 0.10,  # Scale of the Fourier harmonic amplitudes.
    'border_softness': 0.035,  # Sigmoid width of the fuzzy border (image half-width units).
    'lesion_darkness_mean': 0.50,  # Mean of the per-lesion Beta darkness in [0, 1].
    'skin_tone_mean': 0.35,  # 0 = light, 1 = dark.
    'skin_tone_std': 0.25,
    'illumination': 0.20,  # Amplitude of the per-image uneven-lighting ramp.
    'regression_prob': 0.25,  # Fraction of lesions with a pale regression area.
    'hair_rate': 1.4,  # Poisson mean of hairs per image (at most 6).
    'vignette': 0.22,
    'blur_sigma': 0.027,  # Gaussian blur sigma in image half-width units.
    'noise_std': 0.017,
    'brightness': -0.008,
    'contrast': 1.0,
    'colour_gain': (1.015, 0.985, 0.985),
}

# Designed sites 0-3 (loosely after the HAM10000 sources, docs/datasets.md §1.3).
_SITE_DESIGNS: tuple[dict[str, Any], ...] = (
    {
        'source_like': 'vidir_molemax',
        'regression_prob': 0.10,
        'illumination': 0.28,
        'lesion_radius_mean': 0.40,
        'border_irregularity': 0.06,
        'border_softness': 0.025,
        'lesion_darkness_mean': 0.38,
        'skin_tone_mean': 0.18,
        'hair_rate': 0.6,
        'vignette': 0.10,
        'blur_sigma': 0.012,
        'noise_std': 0.010,
        'brightness': 0.02,
        'contrast': 1.05,
        'colour_gain': (0.95, 1.0, 1.07),
    },
    {
        'source_like': 'vidir_modern',
        'regression_prob': 0.25,
        'illumination': 0.16,
        'lesion_radius_mean': 0.50,
        'border_irregularity': 0.10,
        'border_softness': 0.035,
        'lesion_darkness_mean': 0.55,
        'skin_tone_mean': 0.35,
        'hair_rate': 1.5,
        'vignette': 0.18,
        'blur_sigma': 0.022,
        'noise_std': 0.015,
        'brightness': 0.0,
        'contrast': 1.0,
        'colour_gain': (1.0, 1.0, 1.0),
    },
    {
        'source_like': 'rosendahl',
        'regression_prob': 0.40,
        'illumination': 0.20,
        'lesion_radius_mean': 0.58,
        'border_irregularity': 0.14,
        'border_softness': 0.045,
        'lesion_darkness_mean': 0.48,
        'skin_tone_mean': 0.55,
        'hair_rate': 2.5,
        'vignette': 0.15,
        'blur_sigma': 0.034,
        'noise_std': 0.020,
        'brightness': -0.03,
        'contrast': 0.85,
        'colour_gain': (1.07, 1.0, 0.86),
    },
    {
        'source_like': 'vienna_dias',
        'regression_prob': 0.25,
        'illumination': 0.14,
        'lesion_radius_mean': 0.68,
        'border_irregularity': 0.12,
        'border_softness': 0.035,
        'lesion_darkness_mean': 0.60,
        'skin_tone_mean': 0.30,
        'hair_rate': 1.0,
        'vignette': 0.45,
        'blur_sigma': 0.040,
        'noise_std': 0.025,
        'brightness': -0.02,
        'contrast': 1.10,
        'colour_gain': (1.04, 0.94, 1.0),
    },
)

# Valid ranges (after heterogeneity scaling) and the ranges random sites (>= 4) are drawn from.
_CLIP_RANGES: dict[str, tuple[float, float]] = {
    'lesion_radius_mean': (0.25, 0.85),
    'lesion_radius_log_std': (0.0, 0.5),
    'border_irregularity': (0.0, 0.25),
    'border_softness': (0.005, 0.12),
    'lesion_darkness_mean': (0.1, 0.9),
    'skin_tone_mean': (0.0, 1.0),
    'skin_tone_std': (0.0, 0.4),
    'illumination': (0.0, 0.4),
    'regression_prob': (0.0, 1.0),
    'hair_rate': (0.0, float(_MAX_HAIRS)),
    'vignette': (0.0, 0.8),
    'blur_sigma': (0.0, 0.12),
    'noise_std': (0.0, 0.08),
    'brightness': (-0.2, 0.2),
    'contrast': (0.5, 1.5),
    'colour_gain': (0.6, 1.4),
}
_RANDOM_SITE_RANGES: dict[str, tuple[float, float]] = {
    'lesion_radius_mean': (0.40, 0.68),
    'border_irregularity': (0.06, 0.14),
    'border_softness': (0.025, 0.045),
    'lesion_darkness_mean': (0.38, 0.60),
    'skin_tone_mean': (0.18, 0.55),
    'regression_prob': (0.1, 0.4),
    'hair_rate': (0.6, 2.5),
    'vignette': (0.10, 0.45),
    'illumination': (0.14, 0.28),
    'blur_sigma': (0.012, 0.040),
    'noise_std': (0.010, 0.025),
    'brightness': (-0.03, 0.03),
    'contrast': (0.85, 1.10),
    'colour_gain': (0.92, 1.08),
}


def _check_int(name: str, value: Any, minimum: int) -> int:
  """Returns `value` as an int, or raises ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an integer, got {value!r}.')
  if int(value) < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value!r}.')
  return int(value)


def _check_heterogeneity(heterogeneity: Any) -> float:
  if isinstance(heterogeneity, bool) or not isinstance(heterogeneity, numbers.Real):
    raise ValueError(f'heterogeneity must be a real number, got {heterogeneity!r}.')
  if not math.isfinite(float(heterogeneity)) or float(heterogeneity) < 0:
    raise ValueError(f'heterogeneity must be finite and >= 0, got {heterogeneity!r}.')
  return float(heterogeneity)


def _seed_sequence(seed: int, site: int, stream: int) -> np.random.SeedSequence:
  # Same keys as SeedSequence(seed).spawn(site + 1)[site].spawn(stream + 1)[stream].
  return np.random.SeedSequence(seed, spawn_key=(site, stream))


def site_params(site: int, seed: int = 0, heterogeneity: float = 1.0) -> dict[str, Any]:
  """Returns the design of site `site` (a dict of Python scalars / tuples).

  Args:
    site: site index >= 0. Sites 0-3 have fixed designs; later sites are drawn from `seed`.
    seed: non-negative integer seed (only used for sites >= 4).
    heterogeneity: >= 0; scales each parameter's deviation from the nominal design.

  Returns:
    A dict with keys ``site``, ``source_like`` and the scanner / population parameters
    (``lesion_radius_mean``, ``colour_gain``, ``blur_sigma``, ...) described in the module
    docstring, plus ``expected_lesion_fraction`` (≈ π r0² / 4, ignoring clipping).
  """
  site = _check_int('site', site, 0)
  seed = _check_int('seed', seed, 0)
  heterogeneity = _check_heterogeneity(heterogeneity)
  if site < len(_SITE_DESIGNS):
    design = dict(_SITE_DESIGNS[site])
  else:
    rng = np.random.default_rng(_seed_sequence(seed, site, _SITE_STREAM))
    design = {'source_like': 'random'}
    for key, (lo, hi) in _RANDOM_SITE_RANGES.items():
      if key == 'colour_gain':
        design[key] = tuple(float(g) for g in rng.uniform(lo, hi, size=3))
      else:
        design[key] = float(rng.uniform(lo, hi))
  params: dict[str, Any] = {'site': site, 'source_like': design['source_like']}
  for key, nominal in _NOMINAL.items():
    target = design.get(key, nominal)
    lo, hi = _CLIP_RANGES[key]
    value = np.asarray(nominal) + heterogeneity * (np.asarray(target) - np.asarray(nominal))
    value = np.clip(value, lo, hi)
    params[key] = tuple(float(v) for v in value) if value.ndim else float(value)
  params['expected_lesion_fraction'] = math.pi * params['lesion_radius_mean'] ** 2 / 4
  return params


def _lowfreq(rng: np.random.Generator, n: int, coords: np.ndarray, scale: float = 1.0,
             num_waves: int = _TEXTURE_WAVES) -> np.ndarray:
  """Smooth random field [n, H, W], roughly unit-std, from a sum of random plane waves.

  cos(a·x + b·y + φ) = cos(a·x)·cos(b·y + φ) − sin(a·x)·sin(b·y + φ), so the sum over waves is
  one batched matrix product of per-row and per-column factors.
  """
  freq = scale * rng.uniform(1.0, 4.0, size=(n, num_waves, 1))
  angle = rng.uniform(0, 2 * np.pi, size=(n, num_waves, 1))
  phase = rng.uniform(0, 2 * np.pi, size=(n, num_waves, 1))
  col_arg = (freq * np.cos(angle) * coords).astype(np.float32)  # [n, K, W]
  row_arg = (freq * np.sin(angle) * coords + phase).astype(np.float32)  # [n, K, H]
  rows = np.concatenate([np.cos(row_arg), -np.sin(row_arg)], axis=1)  # [n, 2K, H]
  cols = np.concatenate([np.cos(col_arg), np.sin(col_arg)], axis=1)  # [n, 2K, W]
  return np.matmul(rows.transpose(0, 2, 1), cols) * np.float32(math.sqrt(2.0 / num_waves))


def _hair_alpha(rng: np.random.Generator, n: int, hair_rate: float, xx: np.ndarray,
                yy: np.ndarray, image_size: int) -> np.ndarray:
  """Opacity [n, H, W] of thin dark hair curves (quadratic Bézier strokes)."""
  counts = np.minimum(rng.poisson(hair_rate, size=n), _MAX_HAIRS)
  active = (np.arange(_MAX_HAIRS)[None, :] < counts[:, None]).astype(np.float32)
  start = rng.uniform(-1.2, 1.2, size=(n, _MAX_HAIRS, 2))
  direction = rng.uniform(0, 2 * np.pi, size=(n, _MAX_HAIRS))
  length = rng.uniform(0.8, 2.4, size=(n, _MAX_HAIRS))
  bend = rng.normal(0.0, 0.25, size=(n, _MAX_HAIRS)) * length
  pixel = 2.0 / image_size
  half_width = np.maximum(rng.uniform(0.010, 0.018, size=(n, _MAX_HAIRS)), 0.45 * pixel)
  opacity = rng.uniform(0.6, 0.95, size=(n, _MAX_HAIRS)) * active
  unit = np.stack([np.cos(direction), np.sin(direction)], axis=-1)
  normal = np.stack([-unit[..., 1], unit[..., 0]], axis=-1)
  end = start + length[..., None] * unit
  ctrl = 0.5 * (start + end) + bend[..., None] * normal
  t = np.linspace(0.0, 1.0, _HAIR_SEGMENTS + 1)[:, None, None, None]
  points = ((1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end).astype(np.float32)
  alpha = np.zeros((n,) + xx.shape, np.float32)
  x, y = xx[None], yy[None]
  for h in range(_MAX_HAIRS):
    idx = np.flatnonzero(active[:, h])  # Only images that have an h-th hair.
    if not idx.size:
      continue
    dist2 = np.full((idx.size,) + xx.shape, np.inf, np.float32)
    for s in range(_HAIR_SEGMENTS):
      p, q = points[s, idx, h], points[s + 1, idx, h]  # [m, 2]
      px, py = p[:, 0, None, None], p[:, 1, None, None]
      dx, dy = (q[:, 0] - p[:, 0])[:, None, None], (q[:, 1] - p[:, 1])[:, None, None]
      seg2 = np.maximum(dx * dx + dy * dy, 1e-12)
      u = np.clip(((x - px) * dx + (y - py) * dy) / seg2, 0.0, 1.0)
      dist2 = np.minimum(dist2, (x - px - u * dx) ** 2 + (y - py - u * dy) ** 2)
    w2 = (half_width[idx, h] ** 2).astype(np.float32)[:, None, None]
    stroke = opacity[idx, h].astype(np.float32)[:, None, None] * np.exp(-dist2 / w2)
    alpha[idx] = 1.0 - (1.0 - alpha[idx]) * (1.0 - stroke)
  return alpha


def _render_chunk(rng: np.random.Generator, n: int, params: Mapping[str, Any],
                  image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Renders n images in [0, 1] ([n, H, W, 3] float32) and masks ([n, H, W] uint8)."""
  coords = ((np.arange(image_size, dtype=np.float32) + 0.5) / image_size) * 2.0 - 1.0
  yy, xx = np.meshgrid(coords, coords, indexing='ij')

  def col(a):  # [n] -> [n, 1, 1] float32 for broadcasting against [n, H, W].
    return np.asarray(a, np.float32)[:, None, None]

  # ----- Skin.
  tone = np.clip(rng.normal(params['skin_tone_mean'], params['skin_tone_std'], size=n), 0, 1)
  skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * col(tone)[..., None]  # [n, 1, 1, 3]
  lum = 0.035 * _lowfreq(rng, n, coords)
  redness = 0.03 * _lowfreq(rng, n, coords)
  pores = 0.025 * rng.standard_normal((n, image_size, image_size), dtype=np.float32)
  skin = skin * (1.0 + lum + pores)[..., None]
  skin = skin + redness[..., None] * np.array([1.0, -0.5, -0.5], np.float32)

  # ----- Lesion shape: star-convex blob with Fourier-perturbed radius.
  centre = np.clip(rng.normal(0.0, 0.12, size=(n, 2)), -0.3, 0.3)
  rotation = rng.uniform(0, 2 * np.pi, size=n)
  aspect = np.exp(rng.uniform(-0.2, 0.2, size=n))
  r0 = np.clip(params['lesion_radius_mean'] *
               np.exp(rng.normal(0.0, params['lesion_radius_log_std'], size=n)), 0.15, 0.95)
  amps = (params['border_irregularity'] * rng.normal(size=(n, len(_HARMONICS))) /
          np.sqrt(_HARMONICS / 2.0))
  total = np.abs(amps).sum(axis=1, keepdims=True)
  amps = amps * np.minimum(1.0, 0.45 / np.maximum(total, 1e-9))  # Keeps r(θ) >= 0.55 r0.
  phases = rng.uniform(0, 2 * np.pi, size=(n, len(_HARMONICS)))
  dx, dy = xx - col(centre[:, 0]), yy - col(centre[:, 1])
  cos_r, sin_r = col(np.cos(rotation)), col(np.sin(rotation))
  u = (cos_r * dx + sin_r * dy) / col(aspect)
  v = (-sin_r * dx + cos_r * dy) * col(aspect)
  rho = np.sqrt(u * u + v * v)
  # cos(iθ + φ) = cos(iθ)·cos φ − sin(iθ)·sin φ, with cos(iθ), sin(iθ) by angle addition.
  safe_rho = np.maximum(rho, 1e-6)
  cos_1, sin_1 = u / safe_rho, v / safe_rho
  cos_i, sin_i = cos_1, sin_1
  radius = np.ones_like(rho)
  for i, harmonic in enumerate(_HARMONICS):
    for _ in range(int(harmonic) - (1 if i == 0 else int(_HARMONICS[i - 1]))):
      cos_i, sin_i = cos_i * cos_1 - sin_i * sin_1, sin_i * cos_1 + cos_i * sin_1
    radius += (col(amps[:, i] * np.cos(phases[:, i])) * cos_i -
               col(amps[:, i] * np.sin(phases[:, i])) * sin_i)
  radius *= col(r0)
  signed = radius - rho  # > 0 inside the lesion.
  mask = (signed > 0).astype(np.uint8)
  softness = params['border_softness'] * rng.uniform(0.7, 1.4, size=n)
  blob = 0.5 + 0.5 * np.tanh(0.5 * signed / col(softness))  # Overflow-free sigmoid.

  # ----- Pigment: darker centre, dark patches, mottling.
  concentration = 4.0
  mean_dark = params['lesion_darkness_mean']
  darkness = rng.beta(mean_dark * concentration, (1 - mean_dark) * concentration, size=n)
  centre_gain = rng.uniform(0.0, 0.35, size=n)
  field = col(darkness) + col(centre_gain) * np.clip(1.0 - rho / radius, 0.0, 1.0)
  field = field + 0.12 * _lowfreq(rng, n, coords, 2.5)
  num_patches = rng.integers(0, _MAX_PATCHES + 1, size=n)
  for p in range(_MAX_PATCHES):
    offset_angle = rng.uniform(0, 2 * np.pi, size=n)
    offset = rng.uniform(0.0, 0.55, size=n) * r0
    px = centre[:, 0] + offset * np.cos(offset_angle)
    py = centre[:, 1] + offset * np.sin(offset_angle)
    width = rng.uniform(0.15, 0.35, size=n) * r0
    amp = rng.uniform(0.2, 0.5, size=n) * (p < num_patches)
    dist2 = (xx - col(px)) ** 2 + (yy - col(py)) ** 2
    field = field + col(amp) * np.exp(-dist2 / col(2 * width * width))
  field = np.clip(field, 0.0, 1.0)
  # Lesion colour is the skin colour darkened (relative contrast stays visible on every skin
  # tone) and shifted towards brown; very dark pigment picks up a blue-grey veil.
  shade = 0.84 - 0.70 * field
  tint = np.stack([np.ones_like(field), 0.86 - 0.12 * field, 0.78 - 0.10 * field], axis=-1)
  veil = (0.06 * field**3)[..., None] * np.array([0.0, 0.3, 1.0], np.float32)
  lesion = skin * shade[..., None] * tint + veil
  # Regression structure: some lesions have a pale blue-white scar-like area inside.
  has_regression = rng.uniform(size=n) < params['regression_prob']
  reg_angle = rng.uniform(0, 2 * np.pi, size=n)
  reg_offset = rng.uniform(0.0, 0.5, size=n) * r0
  reg_x = centre[:, 0] + reg_offset * np.cos(reg_angle)
  reg_y = centre[:, 1] + reg_offset * np.sin(reg_angle)
  reg_width = rng.uniform(0.2, 0.4, size=n) * r0
  reg_amp = rng.uniform(0.4, 0.7, size=n) * has_regression
  reg_dist2 = (xx - col(reg_x)) ** 2 + (yy - col(reg_y)) ** 2
  regression = col(reg_amp) * np.exp(-reg_dist2 / col(2 * reg_width * reg_width))
  pale = skin.mean(axis=-1, keepdims=True) * np.array([0.88, 0.86, 0.92], np.float32)
  lesion = lesion + regression[..., None] * (pale - lesion)
  alpha = (col(rng.uniform(0.88, 1.0, size=n)) * blob)[..., None]
  image = skin * (1.0 - alpha) + lesion * alpha

  # ----- Hair over skin and lesion (not in the mask).
  hair = _hair_alpha(rng, n, params['hair_rate'], xx, yy, image_size)[..., None]
  hair_colour = (np.array([0.12, 0.08, 0.06], np.float32) *
                 rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(np.float32))
  image = image * (1.0 - hair) + hair_colour * hair

  # ----- Uneven lighting (ramp plus a smooth bump), then the scanner: vignetting, blur,
  # colour cast, brightness/contrast, sensor noise.
  ramp_angle = rng.uniform(0, 2 * np.pi, size=n)
  ramp = col(np.cos(ramp_angle)) * xx + col(np.sin(ramp_angle)) * yy
  light = 1.0 + params['illumination'] * (0.7 * ramp + 0.3 * _lowfreq(rng, n, coords, 0.5))
  image = image * light[..., None]
  rim = np.clip((np.sqrt(xx * xx + yy * yy) - 0.6) / 0.8, 0.0, 1.0) ** 2
  image = image * (1.0 - params['vignette'] * rim)[None, ..., None]
  sigma_px = params['blur_sigma'] * image_size / 2.0
  if sigma_px > 0.05:
    image = ndimage.gaussian_filter(image, sigma=(0, sigma_px, sigma_px, 0), mode='reflect')
  image = image * np.asarray(params['colour_gain'], np.float32)
  image = (image - 0.5) * params['contrast'] + 0.5 + params['brightness']
  image = image + params['noise_std'] * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def render_site(params: Mapping[str, Any], num_examples: int, image_size: int,
                seed_seq: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
  """Renders `num_examples` un-normalised images of one site.

  Args:
    params: a site design from :func:`site_params`.
    num_examples: number of images (>= 0).
    image_size: height = width in pixels (>= 8).
    seed_seq: the stream's seed sequence; chunk generators are spawned from it.

  Returns:
    ``(images, masks)``: float32 RGB in [0, 1] of shape [n, H, W, 3] and uint8 {0, 1} of
    shape [n, H, W].
  """
  num_examples = _check_int('num_examples', num_examples, 0)
  image_size = _check_int('image_size', image_size, 8)
  images = np.zeros((num_examples, image_size, image_size, 3), np.float32)
  masks = np.zeros((num_examples, image_size, image_size), np.uint8)
  num_chunks = -(-num_examples // _CHUNK)
  # Child i of a SeedSequence is determined by its index alone (spawn_key + (i,)).
  children = [np.random.SeedSequence(seed_seq.entropy, spawn_key=seed_seq.spawn_key + (i,))
              for i in range(num_chunks)]
  for i, child in enumerate(children):
    lo, hi = i * _CHUNK, min(num_examples, (i + 1) * _CHUNK)
    images[lo:hi], masks[lo:hi] = _render_chunk(np.random.default_rng(child), hi - lo, params,
                                                image_size)
  return images, masks


def normalize(images: np.ndarray) -> np.ndarray:
  """Maps RGB in [0, 1] to the model input scale with the fixed PIXEL_MEAN / PIXEL_STD."""
  mean = np.asarray(PIXEL_MEAN, np.float32)
  std = np.asarray(PIXEL_STD, np.float32)
  return ((np.asarray(images, np.float32) - mean) / std).astype(np.float32)


def to_rgb(images: np.ndarray) -> np.ndarray:
  """Inverse of :func:`normalize`, clipped to [0, 1] (for display)."""
  mean = np.asarray(PIXEL_MEAN, np.float32)
  std = np.asarray(PIXEL_STD, np.float32)
  return np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)


def make_federation(num_clients: int = 4,
                    examples_per_client: int | Sequence[int] = 256,
                    test_examples_per_client: int = 64,
                    image_size: int = 32,
                    seed: int = 0,
                    heterogeneity: float = 1.0) -> dict:
  """Generates the synthetic dermoscopy federation, one site per client.

  Args:
    num_clients: number of clients / sites (>= 1).
    examples_per_client: training images per client: one int for all clients or a sequence of
      `num_clients` ints (unequal client sizes). Each >= 0.
    test_examples_per_client: test images per client (>= 0).
    image_size: image height = width in pixels (>= 8).
    seed: non-negative integer; the output is a deterministic function of the arguments.
    heterogeneity: >= 0; 0 makes all sites identically distributed, 1 is the designed spread.

  Returns:
    A dict with ``train_x`` / ``test_x`` (lists of float32 [n_k, H, W, 3], normalised with
    PIXEL_MEAN / PIXEL_STD), ``train_y`` / ``test_y`` (lists of uint8 [n_k, H, W] in {0, 1}),
    ``client_names`` (``['site_0', ...]``) and ``site_params`` (list of dicts, see
    :func:`site_params`).

  Raises:
    ValueError: naming the offending argument when a value is invalid.
  """
  num_clients = _check_int('num_clients', num_clients, 1)
  image_size = _check_int('image_size', image_size, 8)
  seed = _check_int('seed', seed, 0)
  test_examples_per_client = _check_int('test_examples_per_client', test_examples_per_client, 0)
  heterogeneity = _check_heterogeneity(heterogeneity)
  if isinstance(examples_per_client, (str, bytes)):
    raise ValueError(f'examples_per_client must be an int or a sequence of ints, got '
                     f'{examples_per_client!r}.')
  if isinstance(examples_per_client, np.ndarray) and examples_per_client.ndim == 0:
    examples_per_client = examples_per_client.item()
  if isinstance(examples_per_client, (Sequence, np.ndarray)):
    counts = list(examples_per_client)
    if len(counts) != num_clients:
      raise ValueError(f'examples_per_client has {len(counts)} entries but num_clients is '
                       f'{num_clients}.')
    counts = [_check_int(f'examples_per_client[{k}]', c, 0) for k, c in enumerate(counts)]
  else:
    counts = [_check_int('examples_per_client', examples_per_client, 0)] * num_clients

  out: dict[str, list] = {key: [] for key in
                          ('train_x', 'train_y', 'test_x', 'test_y', 'client_names',
                           'site_params')}
  for k in range(num_clients):
    params = site_params(k, seed=seed, heterogeneity=heterogeneity)
    for split, n, stream in (('train', counts[k], _TRAIN_STREAM),
                             ('test', test_examples_per_client, _TEST_STREAM)):
      images, masks = render_site(params, n, image_size, _seed_sequence(seed, k, stream))
      out[f'{split}_x'].append(normalize(images))
      out[f'{split}_y'].append(masks)
    out['client_names'].append(f'site_{k}')
    out['site_params'].append(params)
  return out
