"""Label-aware pairings (issue 16): C-Mixup's partner probabilities against
their formula and its draws by a chi-square test, cross-class partners, a
caller's weight matrix; in the torch module and a DALI pipeline."""

import numpy as np
import pytest
import torch
from scipy import stats

from gpumix.config import MixConfig
from gpumix.params import pairs_from_weights, partner_probabilities, partner_weights
from gpumix.torch import Mixup


def test_c_mixup_probabilities_follow_the_formula():
    y = np.array([[0.0, 1.0], [0.2, 0.9], [3.0, -1.0], [0.1, 1.1], [2.5, -0.5]])
    h = 0.7
    config = MixConfig(pairing="c-mixup", cmixup_bandwidth=h)
    got = partner_probabilities(partner_weights(config, y))
    expected = np.zeros((5, 5))
    for i in range(5):
        for j in range(5):
            if i != j:
                expected[i, j] = np.exp(-np.sum((y[i] - y[j]) ** 2) / (2 * h * h))
        expected[i] /= expected[i].sum()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_c_mixup_draws_pass_a_chi_square_test():
    y = np.array([0.0, 0.3, 0.5, 1.5, 2.0, 4.0])
    config = MixConfig(pairing="c-mixup", cmixup_bandwidth=1.0)
    weights = partner_weights(config, y)
    rng = np.random.default_rng(0)
    draws = 20000
    partners = np.stack([pairs_from_weights(weights, rng.random(6)) for _ in range(draws)])
    probabilities = partner_probabilities(weights)
    for i in (0, 3, 5):
        counts = np.bincount(partners[:, i], minlength=6)
        assert counts[i] == 0  # never itself
        others = np.arange(6) != i
        result = stats.chisquare(counts[others], draws * probabilities[i, others])
        assert result.pvalue > 1e-3, (i, counts, probabilities[i])


def test_cross_class_partners_are_of_another_class_where_there_is_one():
    config = MixConfig(pairing="cross-class")
    labels = np.array([0, 0, 0, 1, 2, 2])
    rng = np.random.default_rng(1)
    for _ in range(200):
        pair = pairs_from_weights(partner_weights(config, labels), rng.random(6))
        assert np.all(labels[pair] != labels)
    one_class = np.array([3, 3, 3])
    probabilities = partner_probabilities(partner_weights(config, one_class))
    np.testing.assert_allclose(probabilities, (np.ones((3, 3)) - np.eye(3)) / 2)
    assert pairs_from_weights(partner_weights(config, np.array([7])), [0.4]).tolist() == [0]


def test_the_torch_module_draws_partners_from_its_targets_or_a_matrix():
    x = torch.rand(6, 3, 8, 8)
    values = torch.tensor([0.0, 0.01, 5.0, 5.02, 9.0, 9.03])
    mixup = Mixup(num_classes=5, pairing="c-mixup", targets="regression", cmixup_bandwidth=0.05,
                  seed=0)
    mixup(x.clone(), values)
    assert mixup.last_params.pair.tolist() == [1, 0, 3, 2, 5, 4]  # the only close pairs
    weights = np.zeros((6, 6))
    weights[:, 2] = 1.0
    mixup = Mixup(num_classes=5, pairing="weights", mode="elem", seed=0)
    mixup(x.clone(), torch.arange(6) % 5, pair_weights=torch.from_numpy(weights))
    pair = mixup.last_params.pair
    assert pair[2] != 2 and all(pair[i] == 2 for i in range(6) if i != 2)


@pytest.mark.parametrize("options,call,match", [
    (dict(pairing="weights"), {}, "needs pair_weights"),
    (dict(pairing="flip"), {"pair_weights": np.ones((4, 4))}, "for pairing='weights'"),
    (dict(pairing="weights"), {"pair_weights": -np.ones((4, 4))}, "non-negative"),
    (dict(pairing="weights"), {"pair_weights": np.ones((3, 3))},
     r"pair_weights must be a non-negative \(4, 4\) matrix, got shape \(3, 3\)"),
    (dict(pairing="weights"), {"pair_weights": np.ones((5, 5))}, r"\(4, 4\) matrix"),
])
def test_pairing_inputs_are_checked(options, call, match):
    with pytest.raises(ValueError, match=match):
        Mixup(num_classes=5, **options)(torch.rand(4, 3, 8, 8), torch.arange(4), **call)


def test_bandwidth_must_be_positive():
    with pytest.raises(ValueError, match="cmixup_bandwidth"):
        MixConfig(pairing="c-mixup", cmixup_bandwidth=0.0)


def test_dali_pipelines_pair_across_classes():
    from nvidia.dali import fn, pipeline_def

    import gpumix.dali as gdali

    labels = [0, 0, 1, 1, 1, 2, 0, 2]
    batch = np.random.default_rng(2).integers(0, 256, (8, 6, 5, 3), np.uint8)

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=3)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
        label = fn.external_source(source=lambda: [np.array([y], np.int32) for y in labels],
                                   batch=True)
        return gdali.mix(images, label, num_classes=3, pairing="cross-class", mode="elem",
                         return_params=True)

    p = pipe()
    p.build()
    for _ in range(5):
        outputs = p.run()
        pair = np.array(outputs[3].as_array()).reshape(-1)
        assert np.all(np.array(labels)[pair] != np.array(labels))
    with pytest.raises(ValueError, match="pairing='weights'"):
        @pipeline_def(batch_size=2, num_threads=1, device_id=None)
        def weighted():
            label = fn.external_source(source=lambda: [np.array([0], np.int32)] * 2, batch=True)
            return gdali.mix_params(label, num_classes=2, size=(4, 4), pairing="weights")

        weighted().build()
