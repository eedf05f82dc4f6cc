"""CalibConfig: which calibration data a quantization run records (prompts × sampling steps with CFG)."""
from __future__ import annotations

from dataclasses import dataclass

from diffptq.config.checks import check_guidance, check_positive_int, check_seed


@dataclass(frozen=True)
class CalibConfig:
    """`n_calib` prompts (the `prompts` file, else the model's own calibration prompts: diffptq.data.prompts) ×
    `calib_steps` sampling steps with classifier-free guidance (`guidance_scale`, None: the model's own), recorded
    in batches of `batch_size` prompts; batch b starts from noise seeded `seed + b`."""

    n_calib: int = 32
    calib_steps: int = 10
    batch_size: int = 8
    guidance_scale: float | None = None
    prompts: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.n_calib, "--n_calib")
        check_positive_int(self.calib_steps, "--calib_steps")
        check_positive_int(self.batch_size, "--calib_batch_size")
        check_guidance(self.guidance_scale)
        check_seed(self.seed)
