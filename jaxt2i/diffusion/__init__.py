"""Imagen's diffusion math: schedules, forward noising, losses, guidance, samplers, one loop.

Everything here is independent of the U-Net: it takes a denoiser
`denoise_fn(x_t, model_t, cond) -> prediction`. See DESIGN.md for where it sits.
"""

from jaxt2i.diffusion.guidance import (THRESHOLDINGS, Thresholding, as_thresholding,
                                       cfg_combine, concat_cond, drop_condition,
                                       dynamic_threshold, guided_denoise, static_threshold)
from jaxt2i.diffusion.loop import sample
from jaxt2i.diffusion.losses import (OBJECTIVES, WEIGHTINGS, convert, diffusion_loss,
                                     from_x0_eps, loss_weight, to_x0_eps, weighted_mse)
from jaxt2i.diffusion.noising import add_noise, noise_augment, q_sample
from jaxt2i.diffusion.samplers import (DDIM, DDPM, SAMPLER_NAMES, Denoised, DPMSolverPP,
                                       as_sampler, get_sampler)
from jaxt2i.diffusion.schedules import (SCHEDULE_NAMES, CosineSchedule, DiscreteSchedule,
                                        LinearSchedule, Point, as_schedule, clean_point,
                                        get_schedule)

__all__ = [
    'CosineSchedule', 'DDIM', 'DDPM', 'DPMSolverPP', 'Denoised', 'DiscreteSchedule',
    'LinearSchedule', 'OBJECTIVES', 'Point', 'SAMPLER_NAMES', 'SCHEDULE_NAMES', 'THRESHOLDINGS',
    'Thresholding', 'WEIGHTINGS', 'add_noise', 'as_sampler', 'as_schedule', 'as_thresholding',
    'cfg_combine', 'clean_point', 'concat_cond', 'convert', 'diffusion_loss', 'drop_condition',
    'dynamic_threshold', 'from_x0_eps', 'get_sampler', 'get_schedule', 'guided_denoise',
    'loss_weight', 'noise_augment', 'q_sample', 'sample', 'static_threshold', 'to_x0_eps',
    'weighted_mse',
]
