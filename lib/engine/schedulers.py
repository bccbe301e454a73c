"""The modes' schedulers without a host sync inside the denoising loop, and their noise drawn up front.

diffusers' schedulers make the host wait for the device a few times per step on a GPU: the first step finds its
index with `nonzero().item()` on the device's timesteps; LCMScheduler indexes its (host) `alphas_cumprod` with
the device's timestep and compares it with `>= 0`; and EulerAncestral and LCM draw each step's noise on the host
from the per-image CPU generators and copy it over. The subclasses here (one per scheduler the modes use, put in
at load: `sync_free`) compute the same numbers in the same order, but:
- every per-step scalar comes from the host copy of the schedule, indexed with Python ints, and goes into the
  device arithmetic as a host scalar (a kernel argument: nothing to copy, nothing to wait for);
- the first step's index is found once when the schedule is set, on the host;
- the schedule is computed on the host and only the timesteps are copied to the device (diffusers computes
  Euler's sigmas on the device and copies them back: a sync before the loop);
- each step's noise is a view into `noise`: every image's draws, made before the call from its own CPU generator
  in exactly the order diffusers would draw them (its initial latents, then one per step), copied to the device
  in one transfer (`draw`). Seeds stay portable: the images equal diffusers' with CPU generators, on any device.
Without `noise` set (a pipeline called directly) a step draws from the generator as diffusers does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class Noise:
    """A batch's per-step noise on the device: draw k of every image is `draws[k]` (shape (images, C, h, w))."""

    draws: torch.Tensor
    used: int = 0

    def next(self, like: torch.Tensor) -> torch.Tensor:
        if self.used >= len(self.draws):
            raise RuntimeError(f"the scheduler asked for noise draw {self.used + 1}; {len(self.draws)} were drawn")
        noise = self.draws[self.used]
        if noise.shape != like.shape or noise.dtype != like.dtype:
            drawn, needed = (tuple(noise.shape), noise.dtype), (tuple(like.shape), like.dtype)
            raise RuntimeError(f"noise drawn as {drawn}, needed {needed}")
        self.used += 1
        return noise


class SyncFree:
    """What the three schedulers share: the host schedule, the first index, the noise source."""

    noise: Noise | None = None
    DRAWS_PER_STEP = 0  # noise draws per step (at most): how many `draw` makes

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kwargs):
        super().set_timesteps(num_inference_steps, "cpu", *args, **kwargs)
        host = self.timesteps
        self.host_timesteps = host
        self.host_steps = [int(t) for t in host]  # for indexing host tables with Python ints
        # diffusers' first index for a schedule started without set_begin_index (txt2img): the second match of the
        # first timestep if it repeats, else the first.
        self.first_index = self.index_for_timestep(host[0], host) if len(host) else 0
        self.timesteps = host.to(device) if device is not None else host

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.first_index

    def _noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        if self.noise is not None:
            return self.noise.next(like)
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class SyncFreeEulerDiscrete(SyncFree, EulerDiscreteScheduler):
    """EulerDiscreteScheduler (SD Turbo): deterministic without `s_churn`; diffusers' step compares a sigma tensor
    with s_tmin/s_tmax in Python even then."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
    ):
        if s_churn > 0:  # stochastic Euler: diffusers' own step
            args = (s_churn, s_tmin, s_tmax, s_noise, generator, return_dict)
            return super().step(model_output, timestep, sample, *args)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        sigma_hat = sigma  # sigma * (gamma + 1) with gamma 0
        kind = self.config.prediction_type
        if kind in ("original_sample", "sample"):
            pred_original_sample = model_output
        elif kind == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        elif kind == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            raise ValueError(f"prediction_type {kind} must be one of `epsilon`, or `v_prediction`")
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class SyncFreeEulerAncestral(SyncFree, EulerAncestralDiscreteScheduler):
    """EulerAncestralDiscreteScheduler (SDXL Turbo): one noise draw per step."""

    DRAWS_PER_STEP = 1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)
        kind = self.config.prediction_type
        if kind == "epsilon":
            pred_original_sample = sample - sigma * model_output
        elif kind == "v_prediction":
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            raise ValueError(f"prediction_type {kind} must be one of `epsilon`, or `v_prediction`")
        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt
        prev_sample = prev_sample + self._noise(model_output, generator) * sigma_up
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class SyncFreeLCM(SyncFree, LCMScheduler):
    """LCMScheduler (LCM, the LCM-LoRAs): one noise draw per step but the last. Its per-step alphas come from the
    host table, indexed with the host timestep (diffusers indexes it with the device's, and `add_noise` may have
    moved the table to the device)."""

    DRAWS_PER_STEP = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.host_alphas_cumprod = self.alphas_cumprod  # add_noise (img2img) moves alphas_cumprod to the device

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' first")
        if self.step_index is None:
            self._init_step_index(timestep)
        index, steps, alphas = self.step_index, self.host_steps, self.host_alphas_cumprod
        prev_step = steps[index + 1] if index + 1 < len(steps) else steps[index]
        alpha_prod_t = alphas[steps[index]]
        alpha_prod_t_prev = alphas[prev_step] if prev_step >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(self.host_timesteps[index])
        kind = self.config.prediction_type
        if kind == "epsilon":
            predicted_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        elif kind == "sample":
            predicted_original_sample = model_output
        elif kind == "v_prediction":
            predicted_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        else:
            raise ValueError(f"prediction_type {kind} must be one of `epsilon`, `sample` or `v_prediction`")
        if self.config.thresholding:
            predicted_original_sample = self._threshold_sample(predicted_original_sample)
        elif self.config.clip_sample:
            limit = self.config.clip_sample_range
            predicted_original_sample = predicted_original_sample.clamp(-limit, limit)
        denoised = c_out * predicted_original_sample + c_skip * sample
        if index != self.num_inference_steps - 1:  # no noise after the last step
            noise = self._noise(denoised, generator)
            prev_sample = alpha_prod_t_prev.sqrt() * denoised + beta_prod_t_prev.sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)


SYNC_FREE = {
    EulerDiscreteScheduler: SyncFreeEulerDiscrete,
    EulerAncestralDiscreteScheduler: SyncFreeEulerAncestral,
    LCMScheduler: SyncFreeLCM,
}


def sync_free(scheduler):
    """The sync-free scheduler with `scheduler`'s config (a scheduler of another class is kept as it is). Config keys
    its class does not take (diffusers warned about them when it loaded the config) are left out."""
    cls = SYNC_FREE.get(type(scheduler))
    if cls is None:
        return scheduler
    accepted = inspect.signature(type(scheduler).__init__).parameters
    return cls.from_config({k: v for k, v in scheduler.config.items() if k in accepted or k.startswith("_")})


def draw(
    seeds: list[int],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    steps: int,
    draws_per_step: int,
) -> tuple[torch.Tensor, Noise]:
    """Each image's initial latents (shape `shape`: C, h, w) and its per-step noise, drawn from a CPU generator seeded
    with its seed, in diffusers' order (initial latents, then one draw per step), into one (pinned) host buffer and
    copied to `device` in one transfer. Returns (initial latents (images, C, h, w), the steps' noise)."""
    device = torch.device(device)
    count = 1 + steps * draws_per_step
    host = torch.empty((count, len(seeds), *shape), dtype=dtype, pin_memory=device.type == "cuda")
    for i, seed in enumerate(seeds):
        generator = torch.Generator("cpu").manual_seed(seed)
        for k in range(count):  # as diffusers' randn_tensor draws for a list of generators: (1, C, h, w) each
            torch.randn((1, *shape), generator=generator, dtype=dtype, out=host[k, i : i + 1])
    on_device = host.to(device, non_blocking=True)
    return on_device[0], Noise(on_device[1:])
