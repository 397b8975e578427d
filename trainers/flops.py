"""Model FLOPs utilisation: achieved model FLOPs per second over the hardware's peak."""

from __future__ import annotations

# Dense bf16/fp16 tensor-core peaks (no sparsity), per GPU, from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * d * T.

    PaLM's model-FLOPs formula (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways",
    appendix B): 6N + 12LHQT for N parameters, L layers, H heads of width Q (H * Q = d, the model width) and
    sequence length T. 6N is Kaplan et al. 2020's count ("Scaling Laws for Neural Language Models", section
    2.1): each parameter costs one multiply-add (2 FLOPs) per token forward and two backward. 12LdT adds the
    attention products QK^T and attention x V, 2 * 2 * d * T FLOPs per token and layer forward, times 3 for
    forward and backward. Activation recomputation is not counted (model FLOPs, not hardware FLOPs). N should
    exclude the position embeddings, which are looked up, not multiplied.
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, matched by name; None when unknown (CPUs included)."""
    best = None
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_name.lower() and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return best[1] if best else None


def mfu(tokens_per_s: float, flops_per_token_: float, peak_per_device: float, devices: int) -> float:
    """Fraction of the devices' peak FLOPs that the model's math used."""
    return tokens_per_s * flops_per_token_ / (peak_per_device * devices)


def tflops_per_device(tokens_per_s: float, flops_per_token_: float, devices: int) -> float:
    """Model TFLOP/s each device achieved (the MFU numerator; known without a peak, so logged on CPUs too)."""
    return tokens_per_s * flops_per_token_ / devices / 1e12
