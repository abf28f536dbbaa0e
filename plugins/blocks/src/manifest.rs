//! The tensors (diffusers / transformers key names and shapes) a model part of a given config
//! holds: what `ferrite bench step --model-config` builds random weights for. The lists mirror
//! the loaders; `tests/manifest.rs` checks them against the models diffusers and transformers
//! build from the published configs (`tests/fixtures/configs`).

use std::path::Path;

use ferrite_plugin_api::{Error, Result, Weights};

use crate::clip::ClipTextConfig;
use crate::flux::FluxConfig;
use crate::folder::read;
use crate::key;
use crate::resnet::ResnetCfg;
use crate::t5::T5Config;
use crate::transformer::Transformer2DCfg;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

/// Tensor names and shapes, in the order the loaders read them.
#[derive(Debug, Default)]
pub struct Manifest(pub Vec<(String, Vec<usize>)>);

impl Manifest {
    fn add(&mut self, key: String, shape: &[usize]) {
        self.0.push((key, shape.to_vec()));
    }

    fn linear(&mut self, p: &str, out: usize, inp: usize, bias: bool) {
        self.add(key(p, "weight"), &[out, inp]);
        if bias {
            self.add(key(p, "bias"), &[out]);
        }
    }

    fn conv(&mut self, p: &str, out: usize, inp: usize, k: usize) {
        self.add(key(p, "weight"), &[out, inp, k, k]);
        self.add(key(p, "bias"), &[out]);
    }

    /// A group or layer norm's weight and bias.
    fn norm(&mut self, p: &str, channels: usize) {
        self.add(key(p, "weight"), &[channels]);
        self.add(key(p, "bias"), &[channels]);
    }

    fn resnet(&mut self, p: &str, c: &ResnetCfg) {
        let (i, o) = (c.in_channels, c.out_channels);
        self.norm(&key(p, "norm1"), i);
        self.conv(&key(p, "conv1"), o, i, 3);
        if let Some(t) = c.temb_channels {
            self.linear(&key(p, "time_emb_proj"), o, t, true);
        }
        self.norm(&key(p, "norm2"), o);
        self.conv(&key(p, "conv2"), o, o, 3);
        if i != o {
            self.conv(&key(p, "conv_shortcut"), o, i, 1);
        }
    }

    /// diffusers' `Transformer2DModel`: norm, projections and `BasicTransformerBlock`s (query,
    /// key and value without bias, as diffusers' default `attention_bias` has them).
    fn transformer(&mut self, p: &str, c: &Transformer2DCfg) {
        let ch = c.channels;
        let projection = |m: &mut Self, name: &str| {
            if c.use_linear_projection {
                m.linear(&key(p, name), ch, ch, true);
            } else {
                m.conv(&key(p, name), ch, ch, 1);
            }
        };
        self.norm(&key(p, "norm"), ch);
        projection(self, "proj_in");
        for d in 0..c.depth {
            let b = key(p, &format!("transformer_blocks.{d}"));
            for (attn, kv) in [("attn1", ch), ("attn2", c.context_dim)] {
                let a = key(&b, attn);
                self.linear(&key(&a, "to_q"), ch, ch, false);
                self.linear(&key(&a, "to_k"), ch, kv, false);
                self.linear(&key(&a, "to_v"), ch, kv, false);
                self.linear(&key(&a, "to_out.0"), ch, ch, true);
            }
            for n in ["norm1", "norm2", "norm3"] {
                self.norm(&key(&b, n), ch);
            }
            self.linear(&key(&b, "ff.net.0.proj"), 8 * ch, ch, true);
            self.linear(&key(&b, "ff.net.2"), ch, 4 * ch, true);
        }
        projection(self, "proj_out");
    }
}

/// `UNet2DConditionModel`.
pub fn unet(c: &UNetConfig) -> Manifest {
    let mut m = Manifest::default();
    let ch = &c.block_out_channels;
    let n = ch.len();
    let temb = 4 * ch[0];
    m.conv("conv_in", ch[0], c.in_channels, 3);
    m.linear("time_embedding.linear_1", temb, ch[0], true);
    m.linear("time_embedding.linear_2", temb, temb, true);
    if let (Some(_), Some(width)) = (
        &c.addition_embed_type,
        c.projection_class_embeddings_input_dim,
    ) {
        m.linear("add_embedding.linear_1", temb, width, true);
        m.linear("add_embedding.linear_2", temb, temb, true);
    }
    let mut out = ch[0];
    for (i, &width) in ch.iter().enumerate() {
        let (inp, p) = (out, format!("down_blocks.{i}"));
        out = width;
        for j in 0..c.layers_per_block {
            let rin = if j == 0 { inp } else { out };
            m.resnet(&key(&p, &format!("resnets.{j}")), &c.resnet(rin, out));
            if c.down_block_types[i].starts_with("CrossAttn") {
                m.transformer(&key(&p, &format!("attentions.{j}")), &c.transformer(out, i));
            }
        }
        if i + 1 < n {
            m.conv(&key(&p, "downsamplers.0.conv"), out, out, 3);
        }
    }
    let last = ch[n - 1];
    for j in 0..2 {
        m.resnet(&format!("mid_block.resnets.{j}"), &c.resnet(last, last));
    }
    m.transformer("mid_block.attentions.0", &c.transformer(last, n - 1));
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut out = rev[0];
    for i in 0..n {
        let prev = out;
        out = rev[i];
        let inp = rev[(i + 1).min(n - 1)];
        let p = format!("up_blocks.{i}");
        let layers = c.layers_per_block + 1;
        for j in 0..layers {
            let skip = if j == layers - 1 { inp } else { out };
            let rin = if j == 0 { prev } else { out };
            m.resnet(
                &key(&p, &format!("resnets.{j}")),
                &c.resnet(rin + skip, out),
            );
            if c.up_block_types[i].starts_with("CrossAttn") {
                m.transformer(
                    &key(&p, &format!("attentions.{j}")),
                    &c.transformer(out, n - 1 - i),
                );
            }
        }
        if i + 1 < n {
            m.conv(&key(&p, "upsamplers.0.conv"), out, out, 3);
        }
    }
    m.norm("conv_norm_out", ch[0]);
    m.conv("conv_out", c.out_channels, ch[0], 3);
    m
}

/// `AutoencoderKL`.
pub fn vae(c: &VaeConfig) -> Manifest {
    let mut m = Manifest::default();
    let ch = &c.block_out_channels;
    let (l, last) = (c.latent_channels, ch[ch.len() - 1]);
    let resnet = |m: &mut Manifest, p: &str, i: usize, o: usize| {
        let cfg = ResnetCfg {
            in_channels: i,
            out_channels: o,
            groups: c.norm_num_groups,
            eps: 1e-6,
            temb_channels: None,
        };
        m.resnet(p, &cfg);
    };
    let mid = |m: &mut Manifest, p: &str| {
        resnet(m, &key(p, "resnets.0"), last, last);
        if c.mid_block_add_attention {
            let a = key(p, "attentions.0");
            m.norm(&key(&a, "group_norm"), last);
            for q in ["to_q", "to_k", "to_v", "to_out.0"] {
                m.linear(&key(&a, q), last, last, true);
            }
        }
        resnet(m, &key(p, "resnets.1"), last, last);
    };
    // The encoder's down blocks and the decoder's up blocks: resnets from the previous width,
    // then a resampling conv between levels.
    let levels =
        |m: &mut Manifest, p: &str, widths: &[usize], from: usize, layers: usize, sampler: &str| {
            let mut prev = from;
            for (i, &out) in widths.iter().enumerate() {
                for j in 0..layers {
                    let inp = if j == 0 { prev } else { out };
                    resnet(m, &format!("{p}.{i}.resnets.{j}"), inp, out);
                }
                if i + 1 < widths.len() {
                    m.conv(&format!("{p}.{i}.{sampler}.0.conv"), out, out, 3);
                }
                prev = out;
            }
        };
    m.conv("encoder.conv_in", ch[0], c.in_channels, 3);
    levels(
        &mut m,
        "encoder.down_blocks",
        ch,
        ch[0],
        c.layers_per_block,
        "downsamplers",
    );
    mid(&mut m, "encoder.mid_block");
    m.norm("encoder.conv_norm_out", last);
    m.conv("encoder.conv_out", 2 * l, last, 3);
    m.conv("decoder.conv_in", last, l, 3);
    mid(&mut m, "decoder.mid_block");
    let reversed: Vec<usize> = ch.iter().rev().copied().collect();
    let layers = c.layers_per_block + 1;
    levels(
        &mut m,
        "decoder.up_blocks",
        &reversed,
        last,
        layers,
        "upsamplers",
    );
    m.norm("decoder.conv_norm_out", ch[0]);
    m.conv("decoder.conv_out", c.out_channels, ch[0], 3);
    if c.use_quant_conv {
        m.conv("quant_conv", 2 * l, 2 * l, 1);
    }
    if c.use_post_quant_conv {
        m.conv("post_quant_conv", l, l, 1);
    }
    m
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` (`projection`), as
/// transformers 5 saves them: the first without the `text_model.` level, the second with it.
pub fn clip(c: &ClipTextConfig, projection: bool) -> Manifest {
    let mut m = Manifest::default();
    let (d, t) = (c.hidden_size, if projection { "text_model" } else { "" });
    m.add(
        key(t, "embeddings.token_embedding.weight"),
        &[c.vocab_size, d],
    );
    m.add(
        key(t, "embeddings.position_embedding.weight"),
        &[c.max_position_embeddings, d],
    );
    for i in 0..c.num_hidden_layers {
        let p = key(t, &format!("encoder.layers.{i}"));
        for q in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            m.linear(&key(&p, &format!("self_attn.{q}")), d, d, true);
        }
        m.norm(&key(&p, "layer_norm1"), d);
        m.linear(&key(&p, "mlp.fc1"), c.intermediate_size, d, true);
        m.linear(&key(&p, "mlp.fc2"), d, c.intermediate_size, true);
        m.norm(&key(&p, "layer_norm2"), d);
    }
    m.norm(&key(t, "final_layer_norm"), d);
    if projection {
        // transformers' default projection width.
        let p = c.projection_dim.unwrap_or(512);
        m.linear("text_projection", p, d, false);
    }
    m
}

/// transformers' `T5EncoderModel` as saved (the input embedding once, as `shared`).
pub fn t5(c: &T5Config) -> Manifest {
    let mut m = Manifest::default();
    let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
    m.add("shared.weight".into(), &[c.vocab_size, d]);
    for i in 0..c.num_layers {
        let p = format!("encoder.block.{i}.layer");
        let a = format!("{p}.0.SelfAttention");
        for q in ["q", "k", "v"] {
            m.linear(&key(&a, q), inner, d, false);
        }
        m.linear(&key(&a, "o"), d, inner, false);
        if i == 0 {
            let bias = key(&a, "relative_attention_bias.weight");
            m.add(bias, &[c.relative_attention_num_buckets, c.num_heads]);
        }
        m.add(format!("{p}.0.layer_norm.weight"), &[d]);
        let f = format!("{p}.1.DenseReluDense");
        m.linear(&key(&f, "wi_0"), c.d_ff, d, false);
        m.linear(&key(&f, "wi_1"), c.d_ff, d, false);
        m.linear(&key(&f, "wo"), d, c.d_ff, false);
        m.add(format!("{p}.1.layer_norm.weight"), &[d]);
    }
    m.add("encoder.final_layer_norm.weight".into(), &[d]);
    m
}

/// diffusers' `FluxTransformer2DModel`.
pub fn flux(c: &FluxConfig) -> Manifest {
    let mut m = Manifest::default();
    let (d, hd) = (c.inner_dim(), c.attention_head_dim);
    let mlp = |m: &mut Manifest, p: &str, inp: usize| {
        m.linear(&key(p, "linear_1"), d, inp, true);
        m.linear(&key(p, "linear_2"), d, d, true);
    };
    m.linear("x_embedder", d, c.in_channels, true);
    m.linear("context_embedder", d, c.joint_attention_dim, true);
    mlp(&mut m, "time_text_embed.timestep_embedder", 256);
    if c.guidance_embeds {
        mlp(&mut m, "time_text_embed.guidance_embedder", 256);
    }
    mlp(
        &mut m,
        "time_text_embed.text_embedder",
        c.pooled_projection_dim,
    );
    let qk_norms = |m: &mut Manifest, a: &str, names: [&str; 2]| {
        for n in names {
            m.add(key(a, &format!("{n}.weight")), &[hd]);
        }
    };
    for i in 0..c.num_layers {
        let p = format!("transformer_blocks.{i}");
        let a = key(&p, "attn");
        m.linear(&key(&p, "norm1.linear"), 6 * d, d, true);
        m.linear(&key(&p, "norm1_context.linear"), 6 * d, d, true);
        for n in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_out.0",
        ] {
            m.linear(&key(&a, n), d, d, true);
        }
        m.linear(&key(&a, "to_add_out"), d, d, true);
        qk_norms(&mut m, &a, ["norm_q", "norm_k"]);
        qk_norms(&mut m, &a, ["norm_added_q", "norm_added_k"]);
        for ff in ["ff", "ff_context"] {
            m.linear(&key(&p, &format!("{ff}.net.0.proj")), 4 * d, d, true);
            m.linear(&key(&p, &format!("{ff}.net.2")), d, 4 * d, true);
        }
    }
    for i in 0..c.num_single_layers {
        let p = format!("single_transformer_blocks.{i}");
        let a = key(&p, "attn");
        m.linear(&key(&p, "norm.linear"), 3 * d, d, true);
        for n in ["to_q", "to_k", "to_v"] {
            m.linear(&key(&a, n), d, d, true);
        }
        qk_norms(&mut m, &a, ["norm_q", "norm_k"]);
        m.linear(&key(&p, "proj_mlp"), 4 * d, d, true);
        m.linear(&key(&p, "proj_out"), d, 5 * d, true);
    }
    m.linear("norm_out.linear", 2 * d, d, true);
    m.linear("proj_out", c.out_channels.unwrap_or(c.in_channels), d, true);
    m
}

/// The manifest of a diffusers folder's `part/`, from its `config.json` (the model class
/// decides which).
pub fn of_part(dir: &Path, part: &str) -> Result<Manifest> {
    let path = dir.join(part).join("config.json");
    let source = path.to_string_lossy();
    let text = read(&path)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error(format!("{source}: {e}")))?;
    let class = v["_class_name"]
        .as_str()
        .or_else(|| v["architectures"][0].as_str())
        .unwrap_or("");
    Ok(match class {
        "UNet2DConditionModel" => unet(&UNetConfig::from_json(&text, &source)?),
        "AutoencoderKL" => vae(&VaeConfig::from_json(&text, &source)?),
        "CLIPTextModel" | "CLIPTextModelWithProjection" => clip(
            &ClipTextConfig::from_json(&text, &source)?,
            class == "CLIPTextModelWithProjection",
        ),
        "T5EncoderModel" => t5(&T5Config::from_json(&text, &source)?),
        "FluxTransformer2DModel" => flux(&FluxConfig::from_json(&text, &source)?),
        _ => {
            return Err(Error(format!(
                "{source}: cannot build random weights for a model of class `{class}` \
                 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, \
                 CLIPTextModelWithProjection, T5EncoderModel and FluxTransformer2DModel can)"
            )));
        }
    })
}

/// Random weights for a diffusers folder's `part/`, built from its config alone.
pub fn random_part(dir: &Path, part: &str, seed: u64) -> Result<Weights> {
    let label = format!("{} (random weights)", dir.join(part).display());
    Weights::random(&label, &of_part(dir, part)?.0, seed)
}
