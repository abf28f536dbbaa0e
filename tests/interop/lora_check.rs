//! Writes LoRA files with Ferrite for the tiny SD 1.x pipeline (UNet and text encoder, every
//! adaptable layer, random non-zero weights) in kohya and diffusers format, with Ferrite's UNet
//! output and text-encoder states under them, for tests/fixtures/gen/check_lora_in_diffusers.py
//! to load in diffusers and compare. Not run by CI (it needs Python).
//!
//!     cargo build --workspace && cargo run -p ferrite-tests --example lora_check -- /tmp/lora_check

use std::path::Path;

use ferrite::adapters::{AdapterOptions, ModelLayers, formats::Format, select};
use ferrite::plugins::Registry;
use ferrite::settings::Settings;
use ferrite_plugin_api::{DType, Generator, Tensor, Weights};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: lora_check OUT_DIR"))?;
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    ferrite::runtime::init("cpu")?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let registry = Registry::discover(&[ferrite_tests::profile_dir()], &Settings::default());
    let options = serde_json::json!({ "model": fixtures.join("pipeline/model") });
    let arch = registry.architecture("sd15", &options.to_string())?;
    let model = std::sync::Arc::new(ModelLayers::of(&arch)?);
    let device = ferrite::runtime::Device::current().expect("runtime::init above");
    let _scope = ferrite::runtime::Scope::new(device)
        .with_adapters(model.clone())
        .enter();
    let inputs = Weights::open(
        &fixtures
            .join("adapters/inputs.safetensors")
            .to_string_lossy(),
    )?;
    let get = |k: &str| inputs.get(k, DType::F32);

    for (name, dora) in [("lora", false), ("dora", true)] {
        model.clear();
        let layers = select::select(
            &model.info,
            &select::LayerFilter::new(ferrite::config::LayerPreset::Full, "", false)?,
            |_| true,
        );
        let opts = AdapterOptions {
            rank: 4,
            alpha: 8.0,
            dora,
            seed: 1,
            ..Default::default()
        };
        let summary = model.create(&registry, &layers, &opts)?;
        // A fresh LoRA is the identity: give lora_up (and DoRA's magnitude) values.
        let rng = Generator::new(5)?;
        for (k, t) in model.parameters()? {
            if k.ends_with("lora_up.weight") {
                t.assign(&Tensor::randn(&t.shape()?, &rng)?.mul_scalar(0.05)?)?;
            } else if k.ends_with("dora_scale") {
                t.assign(
                    &t.mul(
                        &Tensor::rand(&t.shape()?, &rng)?
                            .mul_scalar(0.2)?
                            .add_scalar(0.9)?,
                    )?,
                )?;
            }
        }
        let unet = arch.denoise(
            &get("sample")?,
            &get("timesteps")?,
            &[&get("encoder_hidden_states")?],
        )?;
        let text = arch.encode_text(&["a photo of a red cat"])?.remove(0);
        ferrite_plugin_api::save_safetensors(
            &out.join(format!("{name}_ferrite_outputs.safetensors"))
                .to_string_lossy(),
            &[("unet", &unet), ("text", &text)],
            &[],
        )?;
        for format in [Format::Kohya, Format::Diffusers] {
            let file = out.join(format!("{name}_{format:?}.safetensors").to_lowercase());
            model.save(&file, format, ferrite_plugin_api::DType::F32, &[])?;
            println!(
                "{}: {} layers, {} values",
                file.display(),
                summary.layers,
                summary.parameters
            );
        }
    }
    model.clear();
    Ok(())
}
