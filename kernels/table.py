"""The params table: one float64 row per sample, with named columns.

It is the one form in which sampled parameters travel between the layers:
DALI's CPU stage writes it (gpumix.dali.mix_params, the loader's params
operator), and the CPU appliers, the CUDA kernels and the torch hand-off read
it. Every reader uses the column names below, never positions.

    label            class id of sample i (for targets and inspection)
    pair             partner index j of sample i
    lam              weight of the primary (float32 value, exact in float64)
    method           NONE / MIXUP / CUTMIX / FMIX / RESIZEMIX / SMOOTHMIX /
                     GRIDMIX / SALIENCYMIX (gpumix.config)
    y0, y1, x0, x1   box, half-open: CutMix's and SaliencyMix's partner
                     pixels, or where ResizeMix pastes the resized partner;
                     empty for other methods
    key_high/low     FMix spectrum key, two 31-bit halves (key = high << 31 | low)
    rank_low/high    FMix mask: ranks below rank_low take the primary, ranks
                     from rank_high on the partner, a linear ramp between
    decay_power      FMix spectrum decay (the same in every row)
    reference        1 for reference_compatible FMix spectra, else 0
    height, width    the image size the params were made for
    centre_y/x       SmoothMix: the Gaussian's centre (pixels)
    sigma_y/x        SmoothMix: its spread along y and x (pixels)
    square           SmoothMix: 1 for the square variant, 0 for the circle
    grid             GridMix: cells per side n (n * n cells, n <= 8)
    cells_low/high   GridMix: bit c of the 64-bit cell set (low: cells 0..31,
                     high: 32..63) is 1 where cell c = row * n + column
                     takes the partner
    bilinear         ResizeMix: 1 to resize bilinearly, 0 nearest
    label_lam        the weight of the primary's label in the targets: lam,
                     unless the caller maps it (gpumix.torch.Mixup's label_lam)
    z0, z1           volumes: the box's depth extent (a cuboid), else 0, 0
    depth            volumes: D, their images then being D * H rows
                     (height = D * H); 0 for 2-D images
    masked           1 where the row is applied through its mask though its
                     method is a box (a cuboid: CutMix in volumes)
    partner_address  CPU pipelines: address of the partner's pixels
    own_address      CPU pipelines: address of this sample's pixels, as the
                     params step saw them (the appliers check it)
    error_address    CPU pipelines: an int64 flag the appliers set when a
                     partner cannot be found (gpumix.dali.raise_pending)

Every value is exact in float64: integers stay below 2^53 (user-space
addresses below 2^48), lams are float32 values.
"""

from numba import njit

COLUMNS = ("label", "pair", "lam", "method", "y0", "y1", "x0", "x1", "key_high", "key_low",
           "rank_low", "rank_high", "decay_power", "reference", "height", "width",
           "partner_address", "own_address", "error_address", "centre_y", "centre_x", "sigma_y",
           "sigma_x", "square", "grid", "cells_low", "cells_high", "bilinear", "label_lam", "z0",
           "z1", "depth", "masked")

(LABEL, PAIR, LAM, METHOD, Y0, Y1, X0, X1, KEY_HIGH, KEY_LOW, RANK_LOW, RANK_HIGH, DECAY_POWER,
 REFERENCE, HEIGHT, WIDTH, PARTNER_ADDRESS, OWN_ADDRESS, ERROR_ADDRESS, CENTRE_Y, CENTRE_X,
 SIGMA_Y, SIGMA_X, SQUARE, GRID, CELLS_LOW, CELLS_HIGH, BILINEAR, LABEL_LAM, Z0, Z1, DEPTH,
 MASKED) = range(len(COLUMNS))

N_COLUMNS = len(COLUMNS)


@njit(cache=True, nogil=True)
def method_bits(rows):
    """Bit m set when some row's method is m: what a host path asks of a table
    (does it need masks, boxes placed, ...) in one pass, not one per question."""
    bits = 0
    for i in range(rows.shape[0]):
        bits |= 1 << int(rows[i, METHOD])
    return bits


def uses(rows, *methods) -> bool:
    """Whether some row of a host table uses one of the method codes ``methods``."""
    wanted = 0
    for m in methods:
        wanted |= 1 << m
    return bool(method_bits(rows) & wanted)
