"""Imagen's diffusion math: schedules, forward noising, losses, guidance, samplers, one loop.

Everything here is independent of the U-Net: it takes a denoiser
`denoise_fn(x_t, model_t, cond) -> prediction`. See DESIGN.md for where it sits.
"""

from jaxt2i.diffusion.guidance import (THRESHOLDINGS, Thresholding, as_thresholding,
                                       cfg_combine, concat_cond, drop_condition,
                                       dynamic_threshold, guided_denoise, static_threshold)
from jaxt2i.diffusion.loop import denoiser_evaluations, sample
from jaxt2i.diffusion.losses import (OBJECTIVES, WEIGHTINGS, convert, diffusion_loss,
                                     from_x0_eps, loss_weight, to_x0_eps, weighted_mse)
from jaxt2i.diffusion.noising import add_noise, noise_augment, q_sample
from jaxt2i.diffusion.samplers import (CHURN_SAMPLERS, DDIM, DDPM, EDM, SAMPLER_NAMES,
                                       Denoised, DPMSolverPP, Sampler, as_sampler, get_sampler)
from jaxt2i.diffusion.schedules import (GRID_SPACINGS, SCHEDULE_NAMES, CosineSchedule,
                                        DiscreteSchedule, LinearSchedule, Point, as_schedule,
                                        clean_point, get_schedule, grid_point)

__all__ = [
    'CHURN_SAMPLERS', 'CosineSchedule', 'DDIM', 'DDPM', 'DPMSolverPP', 'Denoised',
    'DiscreteSchedule', 'EDM', 'GRID_SPACINGS', 'LinearSchedule', 'OBJECTIVES', 'Point',
    'SAMPLER_NAMES', 'SCHEDULE_NAMES', 'Sampler', 'THRESHOLDINGS', 'Thresholding', 'WEIGHTINGS',
    'add_noise', 'as_sampler', 'as_schedule', 'as_thresholding', 'cfg_combine', 'clean_point',
    'concat_cond', 'convert', 'denoiser_evaluations', 'diffusion_loss', 'drop_condition', 'dynamic_threshold',
    'from_x0_eps', 'get_sampler', 'get_schedule', 'grid_point', 'guided_denoise', 'loss_weight',
    'noise_augment', 'q_sample', 'sample', 'static_threshold', 'to_x0_eps', 'weighted_mse',
]
