"""The params table: one float64 row per sample, with named columns.

It is the one form in which sampled parameters travel between the layers:
DALI's CPU stage writes it (gpumix.dali.mix_params, the loader's params
operator), and the CPU appliers, the CUDA kernels and the torch hand-off read
it. Every reader uses the column names below, never positions.

    label            class id of sample i (for targets and inspection)
    pair             partner index j of sample i
    lam              weight of the primary (float32 value, exact in float64)
    method           NONE / MIXUP / CUTMIX / FMIX (gpumix.config)
    y0, y1, x0, x1   CutMix box, half-open; empty for other methods
    key_high/low     FMix spectrum key, two 31-bit halves (key = high << 31 | low)
    rank_low/high    FMix mask: ranks below rank_low take the primary, ranks
                     from rank_high on the partner, a linear ramp between
    decay_power      FMix spectrum decay (the same in every row)
    reference        1 for reference_compatible FMix spectra, else 0
    height, width    the image size the params were made for
    partner_address  CPU pipelines: address of the partner's pixels
    own_address      CPU pipelines: address of this sample's pixels, as the
                     params step saw them (the appliers check it)
    error_address    CPU pipelines: an int64 flag the appliers set when a
                     partner cannot be found (gpumix.dali.raise_pending)

Every value is exact in float64: integers stay below 2^53 (user-space
addresses below 2^48), lams are float32 values.
"""

COLUMNS = ("label", "pair", "lam", "method", "y0", "y1", "x0", "x1", "key_high", "key_low",
           "rank_low", "rank_high", "decay_power", "reference", "height", "width",
           "partner_address", "own_address", "error_address")

(LABEL, PAIR, LAM, METHOD, Y0, Y1, X0, X1, KEY_HIGH, KEY_LOW, RANK_LOW, RANK_HIGH, DECAY_POWER,
 REFERENCE, HEIGHT, WIDTH, PARTNER_ADDRESS, OWN_ADDRESS, ERROR_ADDRESS) = range(len(COLUMNS))

N_COLUMNS = len(COLUMNS)
