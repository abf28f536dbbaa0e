//! 4-step DDIM and Euler runs with classifier-free guidance, driving the tiny SD 1.x UNet, against
//! diffusers' schedulers (fixtures from tests/fixtures/gen/sampling.py): within 1e-4 max abs.

use ferrite::runtime;
use ferrite::sample::{NoiseSchedule, Sampler, SamplerRun, SchedulerConfig, sample_cfg};
use ferrite_blocks::unet::{UNet2DConditionModel, UNetConfig};
use ferrite_plugin_api::{DType, Tensor, Weights};

fn fixtures() -> String {
    format!("{}/fixtures", env!("CARGO_MANIFEST_DIR"))
}

fn schedule() -> NoiseSchedule {
    let p = format!("{}/sampling/scheduler_config.json", fixtures());
    NoiseSchedule::new(
        SchedulerConfig::from_json(&std::fs::read_to_string(&p).unwrap(), &p).unwrap(),
    )
    .unwrap()
}

fn run(sampler: Sampler, name: &str) {
    runtime::init("cpu").unwrap();
    let unet_dir = format!("{}/unet/sd1_tiny", fixtures());
    let cfg_path = format!("{unet_dir}/config.json");
    let config =
        UNetConfig::from_json(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
    let w = Weights::open(&format!("{unet_dir}/diffusion_pytorch_model.safetensors")).unwrap();
    let unet = UNet2DConditionModel::load(&w, "", &config, DType::F32).unwrap();
    let exp = Weights::open(&format!("{}/sampling/expected.safetensors", fixtures())).unwrap();
    let get = |k: &str| exp.get(k, DType::F32).unwrap();
    let schedule = schedule();
    let mut r = SamplerRun::new(&schedule, sampler, 4, None).unwrap();
    let want_t: Vec<f64> = get(&format!("{name}.timesteps"))
        .to_vec()
        .unwrap()
        .iter()
        .map(|&t| t as f64)
        .collect();
    assert_eq!(r.timesteps, want_t, "timesteps");
    let ctx = Tensor::cat(&[&get("uncond"), &get("cond")], 0).unwrap();
    let latents = sample_cfg(&mut r, &get("noise"), 7.5, |x, t| {
        unet.forward(x, &Tensor::from_f32(&[t as f32, t as f32], &[2])?, &ctx)
    })
    .unwrap();
    let want = get(name).to_vec().unwrap();
    let d = latents
        .to_vec()
        .unwrap()
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(1.0f32, f32::max);
    println!("{name}: 4-step CFG sampling max abs diff {d:.2e} on latents up to {scale:.1}");
    // A random UNet under guidance 7.5 drives the latents far from unit scale (Euler's reach
    // ~58): the bound is 1e-4 per unit of the largest latent, i.e. f32 round-off, not drift.
    assert!(
        d < 1e-4 * scale,
        "{name}: max abs diff {d} on latents up to {scale}"
    );
}

#[test]
fn ddim_four_steps_match_diffusers() {
    run(Sampler::Ddim, "ddim");
}

#[test]
fn euler_four_steps_match_diffusers() {
    run(Sampler::Euler, "euler");
}

#[test]
fn dpmpp_2m_karras_four_steps_match_diffusers() {
    run(Sampler::DpmPp2mKarras, "dpmpp_karras");
}

#[test]
fn euler_ancestral_noise_follows_its_generator() {
    runtime::init("cpu").unwrap();
    let schedule = schedule();
    let x = Tensor::ones(&[1, 4, 2, 2], DType::F32).unwrap();
    let go = |seed: u64| -> Vec<f32> {
        let mut r = SamplerRun::new(
            &schedule,
            Sampler::EulerAncestral,
            3,
            Some(ferrite_plugin_api::Generator::new(seed).unwrap()),
        )
        .unwrap();
        // A denoiser that predicts zero noise: every change comes from the ancestral noise.
        sample_cfg(&mut r, &x, 1.0, |input, _| input.mul_scalar(0.0))
            .unwrap()
            .to_vec()
            .unwrap()
    };
    assert_eq!(go(3), go(3));
    assert_ne!(go(3), go(4));
    assert!(SamplerRun::new(&schedule, Sampler::EulerAncestral, 3, None).is_err());
}

#[test]
fn spacings_and_bad_configs() {
    let mut c = schedule().config;
    c.timestep_spacing = Some("trailing".into());
    let s = NoiseSchedule::new(c.clone()).unwrap();
    assert_eq!(
        s.timesteps(Sampler::Ddim, 4).unwrap(),
        vec![999.0, 749.0, 499.0, 249.0]
    );
    c.timestep_spacing = Some("linspace".into());
    assert_eq!(
        NoiseSchedule::new(c.clone())
            .unwrap()
            .timesteps(Sampler::Ddim, 4)
            .unwrap(),
        vec![999.0, 666.0, 333.0, 0.0]
    );
    c.beta_schedule = "sigmoid".into();
    assert!(
        NoiseSchedule::new(c.clone())
            .unwrap_err()
            .to_string()
            .contains("beta_schedule `sigmoid`")
    );
    c.beta_schedule = "scaled_linear".into();
    c.prediction_type = "sample".into();
    assert!(
        NoiseSchedule::new(c)
            .unwrap_err()
            .to_string()
            .contains("prediction_type `sample`")
    );
    assert!(
        schedule()
            .timesteps(Sampler::Euler, 0)
            .unwrap_err()
            .to_string()
            .contains("steps")
    );
}
