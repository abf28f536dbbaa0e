//! `ferrite sample`: text to image with an architecture plugin, a sampler and CFG.

use std::path::{Path, PathBuf};

use ferrite_plugin_api::{
    DType, Error, Generator, ModelInfo, Result, Tensor, Weights, family::Objective,
    plugin::ArchitectureHandle,
};

use super::flow::FlowMatchConfig;
use super::schedule::{NoiseSchedule, Sampler, SamplerRun, SchedulerConfig, sample_cfg};

#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance, or a guidance-distilled model's embedded guidance (None: the
    /// usual default of each, 7.5 and 3.5).
    pub cfg: Option<f64>,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub sampler: Sampler,
    /// Initial latent noise (tensor `noise`, `[1, C, H/f, W/f]`) instead of seeded noise.
    pub init_noise: Option<PathBuf>,
    /// `epsilon` or `v_prediction` instead of what the model's scheduler says.
    pub prediction_type: Option<String>,
}

/// The conditioning of a CFG pair (negative, then positive prompt) for a `width × height`
/// image: the model's text tensors, zeros for an empty negative where the model says so, and the
/// images' geometry (uncropped, original size = target size, as diffusers' pipelines do) when it
/// takes that.
fn cfg_conditioning(
    arch: &ArchitectureHandle,
    info: &ModelInfo,
    req: &SampleRequest,
) -> Result<Vec<Tensor>> {
    let mut cond = arch.encode_text(&[&req.negative_prompt, &req.prompt])?;
    if info.conditioning.zeros_for_empty_negative && req.negative_prompt.is_empty() {
        cond = cond
            .iter()
            .map(|t| {
                let zeros = t.narrow(0, 0, 1)?.mul_scalar(0.0)?;
                Tensor::cat(&[&zeros, &t.narrow(0, 1, 1)?], 0)
            })
            .collect::<Result<_>>()?;
    }
    if info.conditioning.image_geometry {
        let (h, w) = (req.height as f32, req.width as f32);
        let row = [h, w, 0.0, 0.0, h, w];
        cond.push(Tensor::from_f32(&[row, row].concat(), &[2, 6])?);
    }
    Ok(cond)
}

/// What sample sides must divide by: the VAE's factor (a UNet checks its own downsamplings;
/// `resolution_step` is the coarser bucket step), or for a flow-matching model its resolution
/// step (Flux's 2×2 packing), checked before anything runs.
pub fn sample_step(info: &ModelInfo) -> usize {
    match info.objective {
        Objective::FlowMatch { .. } => info.resolution_step.max(info.vae_scale_factor),
        Objective::Ddpm { .. } => info.vae_scale_factor,
    }
    .max(1)
}

/// Runs the sampler and returns the image as RGB bytes (`height × width × 3`).
pub fn generate(
    arch: &ArchitectureHandle,
    req: &SampleRequest,
    mut on_step: impl FnMut(),
) -> Result<Vec<u8>> {
    let info = ModelInfo::from_json(&arch.model_info()?).map_err(Error)?;
    let (channels, f) = (info.latent_channels, info.vae_scale_factor);
    let step = sample_step(&info);
    if req.width == 0
        || req.height == 0
        || !req.width.is_multiple_of(step)
        || !req.height.is_multiple_of(step)
    {
        return Err(Error(format!(
            "--width and --height must be positive multiples of {step} for this model"
        )));
    }
    let latent_shape = [1, channels, req.height / f, req.width / f];
    let noise = match &req.init_noise {
        Some(p) => {
            let w = Weights::open(&p.to_string_lossy())?;
            let n = w
                .get("noise", DType::F32)
                .map_err(|e| Error(format!("--init-noise: {e}")))?;
            if n.shape()? != latent_shape {
                return Err(Error(format!(
                    "--init-noise {}: tensor `noise` has shape {:?}, this model and size need {latent_shape:?}",
                    p.display(),
                    n.shape()?
                )));
            }
            n
        }
        None => Tensor::randn(&latent_shape, &Generator::new(req.seed)?)?,
    };
    let scheduler = match &info.objective {
        Objective::Ddpm { scheduler } => scheduler,
        Objective::FlowMatch { scheduler } => {
            let latents = sample_flow(arch, &info, req, scheduler, noise, on_step)?;
            return decode(arch, &info, &latents);
        }
    };
    let mut config: SchedulerConfig = serde_json::from_value(scheduler.clone())
        .map_err(|e| Error(format!("the model's scheduler config: {e}")))?;
    if let Some(p) = &req.prediction_type {
        config.prediction_type = p.clone();
    }
    let schedule = NoiseSchedule::new(config)?;
    // Ancestral noise follows the seed (offset from the initial noise's stream).
    let rng = Generator::new(req.seed.wrapping_add(1))?;
    let mut run = SamplerRun::new(&schedule, req.sampler, req.steps, Some(rng))?;
    let cond = cfg_conditioning(arch, &info, req)?;
    let cond: Vec<&Tensor> = cond.iter().collect();
    let latents = sample_cfg(&mut run, &noise, req.cfg.unwrap_or(7.5), |x, t| {
        on_step();
        arch.denoise(x, &Tensor::full(&[2], t, DType::F32)?, &cond)
    })?;
    decode(arch, &info, &latents)
}

/// Euler steps of a flow-matching model from `noise` (σ = 1) to σ = 0, conditioned on the
/// prompt alone: a guidance-distilled model (Flux.1-dev) takes `cfg` as its guidance value, and
/// no model of this kind takes a negative prompt here.
fn sample_flow(
    arch: &ArchitectureHandle,
    info: &ModelInfo,
    req: &SampleRequest,
    scheduler: &serde_json::Value,
    noise: Tensor,
    mut on_step: impl FnMut(),
) -> Result<Tensor> {
    if req.sampler != Sampler::Euler {
        return Err(Error(format!(
            "sampler {}: a flow-matching model samples with Euler steps (euler)",
            req.sampler.as_ref()
        )));
    }
    if req.prediction_type.is_some() {
        return Err(Error::msg(
            "--prediction-type: a flow-matching model predicts the velocity; leave it out",
        ));
    }
    if !req.negative_prompt.is_empty() {
        tracing::warn!("this model samples without a negative prompt; it is ignored");
    }
    let config = FlowMatchConfig::from_json(scheduler)?;
    let step = info.resolution_step.max(1);
    let sigmas = config.sigmas(req.steps, (req.height / step) * (req.width / step))?;
    let mut cond = arch.encode_text(&[&req.prompt])?;
    match (info.conditioning.guidance, req.cfg) {
        (true, cfg) => cond.push(Tensor::full(&[1], cfg.unwrap_or(3.5), DType::F32)?),
        (false, Some(_)) => tracing::warn!("this model takes no guidance; the cfg is ignored"),
        (false, None) => {}
    }
    let cond: Vec<&Tensor> = cond.iter().collect();
    let mut latents = noise;
    for pair in sigmas.windows(2) {
        on_step();
        let t = Tensor::full(
            &[1],
            pair[0] * config.num_train_timesteps as f64,
            DType::F32,
        )?;
        let velocity = arch.denoise(&latents, &t, &cond)?;
        latents = latents.add(&velocity.mul_scalar(pair[1] - pair[0])?)?;
    }
    Ok(latents)
}

/// Scaled latents `[1, C, h, w]` decoded by the model's VAE, as RGB bytes (`H × W × 3`).
pub fn decode(arch: &ArchitectureHandle, info: &ModelInfo, latents: &Tensor) -> Result<Vec<u8>> {
    let mut z = latents.div_scalar(info.scaling_factor)?;
    if let Some(shift) = info.shift_factor {
        z = z.add_scalar(shift)?;
    }
    let image = arch
        .vae_decode(&z)?
        .div_scalar(2.0)?
        .add_scalar(0.5)?
        .clamp(Some(0.0), Some(1.0))?;
    // [1, 3, H, W] -> [H, W, 3], then the one host copy.
    let hwc = image.squeeze(0)?.permute(&[1, 2, 0])?.to_vec()?;
    Ok(hwc.iter().map(|v| (v * 255.0).round() as u8).collect())
}

/// Encodes RGB bytes as PNG and writes them atomically.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(width as u32, height as u32, rgb)
        .ok_or_else(|| Error::msg("image buffer does not match its size"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error(format!("encoding PNG: {e}")))?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| Error(e.to_string()))
}
