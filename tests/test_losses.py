"""Hand-computed values of the loss terms on tiny tensors.

Expected values use ``math.exp`` / ``math.log`` only, so they do not depend on
torch's softmax.  Logits are laid out as ``1xCx2x2`` unless said otherwise;
``pix(...)`` builds such a tensor from per-pixel channel vectors, pixels in
row-major order.
"""

from __future__ import annotations

import math

import pytest
import torch

from ilseg.methods.losses import (
    cross_entropy,
    feature_distillation,
    kd_ilt_output,
    kd_mib,
)


def pix(*pixels: list[float]) -> torch.Tensor:
    """``1xCx2x2`` logits from four per-pixel channel vectors (row-major)."""
    assert len(pixels) == 4
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 2, 2).contiguous()


def labels(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).reshape(1, 2, 2)


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def log_softmax(z: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


# -- cross-entropy ----------------------------------------------------------------
def test_cross_entropy_valid_vs_all():
    z = pix([0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0])
    y = labels(0, 1, 255, 1)
    # pixel 0: -log(1/2) = log 2
    # pixel 1: -log(e^0 / (e^1 + e^0)) = log(1 + e)
    # pixel 2: ignored
    # pixel 3: -log(e^3 / (e^0 + e^3)) = log(1 + e^-3)
    total = math.log(2) + math.log(1 + math.e) + math.log(1 + math.exp(-3))
    assert cross_entropy(z, y).item() == pytest.approx(total / 3, rel=1e-6)  # 3 valid pixels
    assert cross_entropy(z, y, reduction="all").item() == pytest.approx(total / 4, rel=1e-6)  # 4 pixels


def test_cross_entropy_all_ignored_is_zero_with_grad():
    z = pix([0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]).requires_grad_()
    y = labels(255, 255, 255, 255)
    for reduction in ("valid", "all"):
        loss = cross_entropy(z, y, reduction=reduction)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert z.grad is not None and torch.all(z.grad == 0)


def test_cross_entropy_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(pix([0, 0], [0, 0], [0, 0], [0, 0]), labels(0, 0, 0, 0), reduction="mean")  # type: ignore[arg-type]


# -- kd_mib -------------------------------------------------------------------------
def _kd_mib_pixel(student: list[float], teacher: list[float], alpha: float = 1.0) -> float:
    """-(1/C_old) sum_c softmax(alpha z°)_c log softmax(z[:C_old])_c for one pixel."""
    c_old = len(teacher)
    p = softmax([alpha * v for v in teacher])
    q = log_softmax(student[:c_old])
    return -sum(pc * qc for pc, qc in zip(p, q)) / c_old


def test_kd_mib_single_pixel_value():
    student = torch.tensor([0.0, 2.0, 5.0]).reshape(1, 3, 1, 1)
    teacher = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    # teacher p = (e/(e+1), 1/(e+1)); student log-softmax over channels 0,1 only:
    # (0 - log(1+e^2), 2 - log(1+e^2)); the new channel (5) takes no part.
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    lse = math.log(1 + math.exp(2))
    expected = -(p0 * (0 - lse) + p1 * (2 - lse)) / 2  # the 1/C_old factor, C_old = 2
    assert kd_mib(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(_kd_mib_pixel([0.0, 2.0, 5.0], [1.0, 0.0]), rel=1e-12)


def test_kd_mib_ignores_new_channels():
    student = pix([0.5, -1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, -2.0], [2.0, 2.0, 1.0])
    teacher = pix([1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5])
    before = kd_mib(student, teacher)
    shifted = student.clone()
    shifted[:, 2] += 100.0  # a large value on the new channel
    assert kd_mib(shifted, teacher).item() == pytest.approx(before.item(), rel=1e-6)


def test_kd_mib_alpha_and_pixel_mean():
    s = [[0.5, -1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, -2.0], [2.0, 2.0, 1.0]]
    t = [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]
    for alpha in (1.0, 2.0):
        expected = sum(_kd_mib_pixel(si, ti, alpha) for si, ti in zip(s, t)) / 4
        assert kd_mib(pix(*s), pix(*t), alpha=alpha).item() == pytest.approx(expected, rel=1e-6)
    # alpha 2 sharpens the teacher: softmax(2*(1, 0)) = (e^2, 1)/(e^2 + 1) at pixel 0.
    assert softmax([2.0, 0.0])[0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))


def test_kd_mib_mask_averages_over_masked_pixels():
    s = [[0.5, -1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, -2.0], [2.0, 2.0, 1.0]]
    t = [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]
    y = labels(0, 255, 2, 255)
    mask = y != 255  # pixels 0 and 2
    expected = (_kd_mib_pixel(s[0], t[0]) + _kd_mib_pixel(s[2], t[2])) / 2
    assert kd_mib(pix(*s), pix(*t), mask=mask).item() == pytest.approx(expected, rel=1e-6)
    z = pix(*s).requires_grad_()
    empty = kd_mib(z, pix(*t), mask=torch.zeros(1, 2, 2, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert z.grad is not None


def test_kd_mib_minimum_at_teacher_is_entropy_over_c_old():
    teacher = [1.0, -0.5]
    # student == teacher on the old channels: L = H(p) / C_old with H(p) = -sum p log p
    p = softmax(teacher)
    entropy = -sum(v * math.log(v) for v in p)
    student = torch.tensor([1.0, -0.5, 4.0]).reshape(1, 3, 1, 1)
    t = torch.tensor(teacher).reshape(1, 2, 1, 1)
    at_teacher = kd_mib(student, t).item()
    assert at_teacher == pytest.approx(entropy / 2, rel=1e-6)
    for delta in (-0.3, 0.3):
        perturbed = student.clone()
        perturbed[0, 0] += delta
        assert kd_mib(perturbed, t).item() > at_teacher


# -- kd_ilt_output -------------------------------------------------------------------
def _ilt_pixel(student: list[float], teacher: list[float], temperature: float = 1.0) -> float:
    """-sum_{c<C_old} softmax(z°/T)_c log softmax(z/T)_c over ALL student channels."""
    p = softmax([v / temperature for v in teacher])
    q = log_softmax([v / temperature for v in student])
    return -sum(p[c] * q[c] for c in range(len(teacher)))


S3 = [[0.5, -1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, -2.0], [2.0, 2.0, 1.0]]
T2 = [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]
Y = labels(0, 1, 2, 255)  # background, old class 1, new class 2, ignored (C_old = 2)


def test_kd_ilt_output_single_pixel_value():
    # teacher p = softmax(1, 0) = (e, 1)/(e + 1); student softmax over 3 channels (0.5, -1, 2):
    # log q_c = z_c - log(e^0.5 + e^-1 + e^2)
    lse = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(2.0))
    expected = -(math.e / (math.e + 1) * (0.5 - lse) + 1 / (math.e + 1) * (-1.0 - lse))
    got = kd_ilt_output(torch.tensor(S3[0]).reshape(1, 3, 1, 1), torch.tensor(T2[0]).reshape(1, 2, 1, 1),
                        torch.zeros(1, 1, 1, dtype=torch.int64))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("mask", "pixels"),
    [("old_bgr", [0, 1]),     # target 0 or an old class (< C_old), 255 excluded
     ("all", [0, 1, 2, 3]),   # every pixel, the ignored one included
     ("old", [1])],           # old classes without background
)
def test_kd_ilt_output_masks(mask, pixels):
    expected = sum(_ilt_pixel(S3[i], T2[i]) for i in pixels) / len(pixels)
    got = kd_ilt_output(pix(*S3), pix(*T2), Y, mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_ilt_output_temperature():
    expected = sum(_ilt_pixel(S3[i], T2[i], 2.0) for i in (0, 1)) / 2  # no T^2 factor
    assert kd_ilt_output(pix(*S3), pix(*T2), Y, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_ilt_output_uses_all_student_channels():
    before = kd_ilt_output(pix(*S3), pix(*T2), Y, mask="all").item()
    shifted = pix(*S3)
    shifted[:, 2] += 1.0  # raising the new channel lowers the old channels' probabilities
    after = kd_ilt_output(shifted, pix(*T2), Y, mask="all").item()
    expected = sum(_ilt_pixel([a, b, c + 1.0], T2[i]) for i, (a, b, c) in enumerate(S3)) / 4
    assert after == pytest.approx(expected, rel=1e-6)
    assert after > before


def test_kd_ilt_output_no_selected_pixel_is_zero_with_grad():
    z = pix(*S3).requires_grad_()
    y = labels(0, 2, 2, 255)  # MiB-style targets: no old foreground class
    loss = kd_ilt_output(z, pix(*T2), y, mask="old")
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)


def test_kd_rejects_teacher_with_more_channels():
    with pytest.raises(ValueError, match="teacher"):
        kd_mib(pix(*T2), pix(*S3))


# -- feature distillation -----------------------------------------------------------
def test_feature_distillation_is_mse():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    f_old = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(1, 1, 2, 2)
    # differences 0, 2, 3, 2 -> (0 + 4 + 9 + 4) / 4 = 4.25
    assert feature_distillation(f, f_old).item() == pytest.approx(4.25)


# -- gradients and mixed precision ----------------------------------------------------
def test_gradients_reach_student_not_teacher():
    z = pix(*S3).requires_grad_()
    z_old = pix(*T2).requires_grad_()
    f = torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(0)).requires_grad_()
    f_old = torch.zeros(1, 4, 1, 1, requires_grad=True)
    loss = kd_mib(z, z_old) + kd_ilt_output(z, z_old, Y) + feature_distillation(f, f_old)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert z_old.grad is None and f_old.grad is None


def test_bf16_autocast_matches_float32():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 3, generator=g) * 3
    z_old = torch.randn(2, 3, 3, 3, generator=g) * 3
    f, f_old = torch.randn(2, 5, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    y = torch.randint(0, 4, (2, 3, 3), generator=g)
    y[0, 0, 0] = 255

    def all_losses(zz, zo, ff, fo):
        return [cross_entropy(zz, y), cross_entropy(zz, y, reduction="all"), kd_mib(zz, zo),
                kd_ilt_output(zz, zo, y), kd_ilt_output(zz, zo, y, mask="all", temperature=2.0),
                feature_distillation(ff, fo)]

    reference = all_losses(z, z_old, f, f_old)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = all_losses(z.bfloat16(), z_old.bfloat16(), f.bfloat16(), f_old.bfloat16())
    for ref, got in zip(reference, low):
        assert got.dtype == torch.float32
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), abs=1e-2, rel=1e-2)


def test_losses_accept_inference_mode_teacher_outputs():
    """The engine runs the teacher under inference_mode and passes its tensors on uncopied."""
    import torch

    from ilseg.methods import feature_distillation, kd_ilt_output, kd_mib

    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    feats = torch.randn(2, 5, 2, 2, requires_grad=True)
    with torch.inference_mode():
        t_logits = torch.randn(2, 3, 3, 3)
        t_feats = torch.randn(2, 5, 2, 2)
    target = torch.zeros(2, 3, 3, dtype=torch.long)
    total = kd_mib(student, t_logits) + kd_ilt_output(student, t_logits, target) + feature_distillation(feats, t_feats)
    total.backward()
    assert student.grad is not None and feats.grad is not None
    expected_fd = ((feats.detach() - t_feats) ** 2).mean()
    assert torch.allclose(feature_distillation(feats, t_feats), expected_fd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cross_entropy_keeps_one_tensor_and_has_the_textbook_gradient(dtype):
    """The KD terms' soft cross-entropy: value and gradient of -sum_c p_c log softmax(s)_c (s over all L
    channels, p over the first K), while backward keeps one tensor in the logits' dtype."""
    from ilseg.methods.losses import _soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, 4, generator=g).to(dtype).requires_grad_()
    p = torch.softmax(torch.randn(2, 3, 3, 4, generator=g), dim=1)
    weights = torch.rand(2, 3, 4, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = _soft_cross_entropy(p, s)
    (value * weights).sum().backward()
    ref_s = s.detach().float().requires_grad_()
    ref = -(p * torch.log_softmax(ref_s, dim=1)[:, :3]).sum(dim=1)
    (ref * weights).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(value, ref.detach(), rtol=tol, atol=tol)
    assert s.grad.dtype == dtype
    torch.testing.assert_close(s.grad.float(), ref_s.grad, rtol=tol, atol=tol)
    assert len(saved) == 1 and saved[0].dtype == dtype and saved[0].shape == s.shape
