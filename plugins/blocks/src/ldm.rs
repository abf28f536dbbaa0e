//! Original (ldm / CompVis) single-file checkpoints: their keys seen as diffusers names, and the
//! model configs read off the tensor shapes. The names follow diffusers' own conversion
//! (`diffusers.loaders.single_file_utils`); values a file cannot show (heads, norm groups, VAE
//! scaling) take SD 1.x's original config unless a diffusers config is given instead.

use ferrite_plugin_api::{
    Error, Result, Tensor, WeightInfo, Weights,
    serde_json::{Value, json},
};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x's OpenCLIP ViT-H text tower ([`crate::open_clip`]).
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

fn shape(w: &Weights, key: &str) -> Result<Vec<usize>> {
    w.info(key)
        .map(|i| i.shape.iter().map(|&d| d as usize).collect())
        .ok_or_else(|| Error(format!("{}: missing tensor `{key}`", w.path())))
}

/// Dimension `i` of tensor `key`, or an error naming both.
pub(crate) fn dim(w: &Weights, key: &str, i: usize) -> Result<usize> {
    shape(w, key)?.get(i).copied().ok_or_else(|| {
        Error(format!(
            "{}: tensor `{key}` has too few dimensions (no dimension {i})",
            w.path()
        ))
    })
}

/// The distinct values of the path segment after `prefix` (`input_blocks.` → block numbers).
fn indices(w: &Weights, prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = w
        .infos()
        .iter()
        .filter_map(|i| i.key.as_str().strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn has(w: &Weights, key: &str) -> bool {
    w.info(key).is_some()
}

/// `rest` split at its first `n` dots: `("a", "b", "c.d")` for n = 2.
fn segments(rest: &str) -> Option<(&str, usize, &str)> {
    let (head, tail) = rest.split_once('.')?;
    let (n, tail) = tail.split_once('.')?;
    Some((head, n.parse().ok()?, tail))
}

/// A diffusers VAE's tensors under the original names (`first_stage_model.*`), its attention
/// projections as the 1×1 convs they are there.
pub fn vae_export(w: &Weights, levels: usize) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for info in w.infos() {
        let k = info.key.as_str();
        let (old, conv) = vae_original(k, levels)
            .ok_or_else(|| Error(format!("no original name for VAE tensor `{k}`")))?;
        let mut t = w.get(k, ferrite_plugin_api::DType::F32)?;
        if conv && t.rank()? == 2 {
            t = t.unsqueeze(2)?.unsqueeze(3)?;
        }
        out.push((format!("{VAE_PREFIX}{old}"), t));
    }
    Ok(out)
}

/// The VAE's tensors in diffusers' keys under `vae.` (the `diffusers` export layout), as loaded.
pub fn vae_diffusers(w: &Weights) -> Result<Vec<(String, Tensor)>> {
    w.infos()
        .iter()
        .map(|i| {
            let t = w.get(&i.key, ferrite_plugin_api::DType::F32)?;
            Ok((format!("vae.{}", i.key), t))
        })
        .collect()
}

/// The view of the tensors under `prefix`, renamed by `rename` (None drops a tensor).
fn renamed(
    w: &Weights,
    prefix: &str,
    rename: impl Fn(&str, &[u64]) -> Option<(String, Vec<u64>)>,
) -> Result<Weights> {
    w.view(|info| {
        let rest = info.key.as_str().strip_prefix(prefix)?;
        let (key, shape) = rename(rest, &info.shape)?;
        Some(WeightInfo {
            key,
            dtype: info.dtype,
            shape,
        })
    })
}

/// The family an original single-file checkpoint holds, told by its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFamily {
    /// `cond_stage_model.transformer.*`: SD 1.x's CLIP.
    Sd1,
    /// `cond_stage_model.model.*`: SD 2.x's OpenCLIP.
    Sd2,
    /// `conditioner.embedders.*` or `label_emb`.
    Sdxl,
    /// `double_blocks.*`.
    Flux,
    Unknown,
}

impl FileFamily {
    pub fn of(w: &Weights) -> Self {
        let any = |prefix: &str| w.infos().iter().any(|i| i.key.starts_with(prefix));
        if any("double_blocks.") || any("model.diffusion_model.double_blocks.") {
            Self::Flux
        } else if any("conditioner.embedders.") || any("model.diffusion_model.label_emb.") {
            Self::Sdxl
        } else if any(OPEN_CLIP_PREFIX) {
            Self::Sd2
        } else if any(CLIP_PREFIX) {
            Self::Sd1
        } else {
            Self::Unknown
        }
    }

    /// What a plugin that does not load this family says about it.
    pub fn refusal(self) -> &'static str {
        match self {
            Self::Sd1 | Self::Sd2 => {
                "an SD 1.x/2.x checkpoint (cond_stage_model.*); use sd15 or sd2"
            }
            Self::Sdxl => "an SDXL checkpoint (conditioner.embedders.*); use the sdxl architecture",
            Self::Flux => "a Flux checkpoint (double_blocks.*); use the flux architecture",
            Self::Unknown => "not a Stable Diffusion checkpoint",
        }
    }
}

// ---- UNet ----

fn unet_resnet(rest: &str) -> String {
    for (old, new) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(t) = rest.strip_prefix(old) {
            return format!("{new}{t}");
        }
    }
    rest.to_string()
}

/// The diffusers name of an ldm UNet key (without `model.diffusion_model.`).
pub fn unet_key(k: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    for (old, new) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(t) = k.strip_prefix(old) {
            return Some(format!("{new}{t}"));
        }
    }
    let (part, n, rest) = segments(k)?;
    if part == "middle_block" {
        return Some(match n {
            0 | 2 => format!("mid_block.resnets.{}.{}", n / 2, unet_resnet(rest)),
            1 => format!("mid_block.attentions.0.{rest}"),
            _ => return None,
        });
    }
    let (j, rest) = rest.split_once('.')?;
    let j: usize = j.parse().ok()?;
    Some(match part {
        "input_blocks" if n >= 1 => {
            let (b, l) = ((n - 1) / per, (n - 1) % per);
            match (j, rest.strip_prefix("op.")) {
                (0, Some(t)) => format!("down_blocks.{b}.downsamplers.0.conv.{t}"),
                (0, None) => format!("down_blocks.{b}.resnets.{l}.{}", unet_resnet(rest)),
                (1, _) => format!("down_blocks.{b}.attentions.{l}.{rest}"),
                _ => return None,
            }
        }
        "output_blocks" => {
            let (b, l) = (n / per, n % per);
            match (j, rest.strip_prefix("conv.")) {
                (0, _) => format!("up_blocks.{b}.resnets.{l}.{}", unet_resnet(rest)),
                (1 | 2, Some(t)) => format!("up_blocks.{b}.upsamplers.0.conv.{t}"),
                (1, None) => format!("up_blocks.{b}.attentions.{l}.{rest}"),
                _ => return None,
            }
        }
        _ => return None,
    })
}

fn unet_resnet_original(rest: &str) -> String {
    for (new, old) in [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ] {
        if rest == new {
            return old.to_string();
        }
    }
    rest.to_string()
}

/// A UNet's block layout, which its original module names depend on.
#[derive(Debug, Clone)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    /// Per up block: whether it has attentions.
    pub cross_up: Vec<bool>,
}

impl UnetLayout {
    pub fn of(c: &crate::unet::UNetConfig) -> Self {
        Self {
            layers_per_block: c.layers_per_block,
            cross_up: c
                .up_block_types
                .iter()
                .map(|t| t.starts_with("CrossAttn"))
                .collect(),
        }
    }

    /// The original (ldm) module name of a diffusers UNet module.
    pub fn original(&self, module: &str) -> Result<String> {
        unet_original(module, self.layers_per_block, &self.cross_up)
            .ok_or_else(|| Error(format!("no original name for UNet module `{module}`")))
    }

    /// The original checkpoint key of a diffusers UNet tensor (`model.diffusion_model.*`).
    pub fn export_key(&self, key: &str) -> Result<String> {
        let (module, param) = key
            .rsplit_once('.')
            .ok_or_else(|| Error(format!("unexpected UNet tensor `{key}`")))?;
        Ok(format!("{UNET_PREFIX}{}.{param}", self.original(module)?))
    }

    /// sd-scripts' LoRA name of a UNet layer where its U-Net keeps the original blocks (SDXL):
    /// `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`.
    pub fn kohya(&self, module: &str) -> Result<String> {
        Ok(format!(
            "lora_unet_{}",
            crate::keys::flat(&self.original(module)?)
        ))
    }
}

/// The original (ldm) name of a diffusers UNet module (the inverse of [`unet_key`] for module
/// names): `down_blocks.0.attentions.0.proj_in` → `input_blocks.1.1.proj_in`. `cross_up[b]` says
/// whether up block `b` has attentions (its upsampler then comes third).
pub fn unet_original(module: &str, layers_per_block: usize, cross_up: &[bool]) -> Option<String> {
    let per = layers_per_block + 1;
    let fixed = [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ];
    if let Some((_, old)) = fixed.iter().find(|(new, _)| *new == module) {
        return Some(old.to_string());
    }
    if let Some(rest) = module.strip_prefix("mid_block.") {
        let (kind, rest) = rest.split_once('.')?;
        let (i, rest) = rest.split_once('.')?;
        return match (kind, i.parse::<usize>().ok()?) {
            ("resnets", i) => Some(format!(
                "middle_block.{}.{}",
                2 * i,
                unet_resnet_original(rest)
            )),
            ("attentions", 0) => Some(format!("middle_block.1.{rest}")),
            _ => None,
        };
    }
    let (part, b, rest) = segments(module)?;
    let (kind, rest) = rest.split_once('.')?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    Some(match (part, kind) {
        ("down_blocks", "resnets") => {
            format!(
                "input_blocks.{}.0.{}",
                1 + b * per + l,
                unet_resnet_original(rest)
            )
        }
        ("down_blocks", "attentions") => format!("input_blocks.{}.1.{rest}", 1 + b * per + l),
        ("down_blocks", "downsamplers") => format!("input_blocks.{}.0.op", (b + 1) * per),
        ("up_blocks", "resnets") => {
            format!(
                "output_blocks.{}.0.{}",
                b * per + l,
                unet_resnet_original(rest)
            )
        }
        ("up_blocks", "attentions") => format!("output_blocks.{}.1.{rest}", b * per + l),
        ("up_blocks", "upsamplers") => {
            let j = if *cross_up.get(b)? { 2 } else { 1 };
            format!("output_blocks.{}.{j}.conv", b * per + layers_per_block)
        }
        _ => return None,
    })
}

/// The UNet of a single-file checkpoint under diffusers names.
pub fn unet(w: &Weights, layers_per_block: usize) -> Result<Weights> {
    renamed(w, UNET_PREFIX, |k, s| {
        unet_key(k, layers_per_block).map(|n| (n, s.to_vec()))
    })
}

/// The UNet's `config.json` read off the shapes of an ldm checkpoint's `model.diffusion_model.*`.
/// SD 1.x has 8 heads per block; a 1024- or 2048-wide cross-attention (SD 2.x, SDXL) has 64
/// channels per head, and SDXL's `label_emb` makes the added text/time embeddings;
/// other values are left to the config's defaults (SD's).
pub fn unet_config(w: &Weights) -> Result<Value> {
    let p = |k: &str| format!("{UNET_PREFIX}{k}");
    let in_channels = dim(w, &p("input_blocks.0.0.weight"), 1)?;
    let out_channels = dim(w, &p("out.2.weight"), 0)?;
    let inputs = indices(w, &p("input_blocks."));
    let downsamplers = inputs
        .iter()
        .filter(|&&n| has(w, &p(&format!("input_blocks.{n}.0.op.weight"))))
        .count();
    let levels = downsamplers + 1;
    let blocks = inputs.len().saturating_sub(1 + downsamplers);
    if inputs.is_empty() || blocks == 0 || !blocks.is_multiple_of(levels) {
        return Err(Error(format!(
            "{}: the UNet's input_blocks do not form a SD UNet ({} blocks, {downsamplers} downsamplers)",
            w.path(),
            inputs.len()
        )));
    }
    let lpb = blocks / levels;
    let (mut widths, mut down, mut depth) = (vec![], vec![], vec![]);
    let (mut cross, mut linear) = (None, false);
    for b in 0..levels {
        let n = 1 + b * (lpb + 1);
        widths.push(dim(
            w,
            &p(&format!("input_blocks.{n}.0.out_layers.3.weight")),
            0,
        )?);
        let attn = p(&format!("input_blocks.{n}.1."));
        if let Ok(proj_in) = shape(w, &format!("{attn}proj_in.weight")) {
            linear = proj_in.len() == 2;
            depth.push(indices(w, &format!("{attn}transformer_blocks.")).len());
            cross = Some(dim(
                w,
                &format!("{attn}transformer_blocks.0.attn2.to_k.weight"),
                1,
            )?);
            down.push("CrossAttnDownBlock2D");
        } else {
            depth.push(1);
            down.push("DownBlock2D");
        }
    }
    let up: Vec<&str> = down
        .iter()
        .rev()
        .map(|&d| match d {
            "DownBlock2D" => "UpBlock2D",
            _ => "CrossAttnUpBlock2D",
        })
        .collect();
    let cross = cross.ok_or_else(|| {
        Error(format!(
            "{}: the UNet has no cross-attention (not a text-to-image SD UNet)",
            w.path()
        ))
    })?;
    // SD 2.x (1024) and SDXL (2048): 64 channels per head; SD 1.x: 8 heads.
    let heads: Vec<usize> = if matches!(cross, 1024 | 2048) {
        widths.iter().map(|c| c / 64).collect()
    } else {
        vec![8; levels]
    };
    // SDXL's added embeddings: pooled text and the size/crop sinusoids into `label_emb`.
    let added = shape(w, &p("label_emb.0.0.weight"))
        .ok()
        .and_then(|s| s.get(1).copied());
    Ok(json!({
        "addition_embed_type": added.map(|_| "text_time"),
        "projection_class_embeddings_input_dim": added,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": lpb,
        "attention_head_dim": heads,
        "cross_attention_dim": cross,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
    }))
}

/// [`unet_config`] for SDXL: `label_emb` takes the pooled text (`pooled` features, the second
/// text encoder's projection) and six sinusoid embeddings of the sizes and crop.
pub fn sdxl_unet_config(w: &Weights, pooled: usize) -> Result<Value> {
    let mut unet = unet_config(w)?;
    let added = unet["projection_class_embeddings_input_dim"]
        .as_u64()
        .map(|a| a as usize)
        .ok_or_else(|| {
            Error(format!(
                "{}: the UNet has no label_emb (not SDXL)",
                w.path()
            ))
        })?;
    let sinusoids = added
        .checked_sub(pooled)
        .filter(|&n| n > 0 && n % 6 == 0)
        .ok_or_else(|| {
            Error(format!(
                "{}: label_emb takes {added} features, which is not the pooled text ({pooled}) \
                 and six size/crop embeddings",
                w.path()
            ))
        })?;
    unet["addition_time_embed_dim"] = (sinusoids / 6).into();
    Ok(unet)
}

// ---- VAE ----

fn vae_attention(rest: &str) -> Option<&'static str> {
    Some(match rest.split('.').next()? {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        _ => return None,
    })
}

/// The diffusers name and shape of an ldm VAE key (without `first_stage_model.`); the attention
/// projections are 1×1 convs there and linear layers in diffusers.
pub fn vae_key(k: &str, shape: &[u64], levels: usize) -> Option<(String, Vec<u64>)> {
    let same = |n: String| Some((n, shape.to_vec()));
    let (coder, rest) = k.split_once('.')?;
    if !matches!(coder, "encoder" | "decoder") {
        return matches!(coder, "quant_conv" | "post_quant_conv").then(|| (k.into(), shape.into()));
    }
    let rest = rest.replace("nin_shortcut", "conv_shortcut");
    if let Some(t) = rest.strip_prefix("norm_out.") {
        return same(format!("{coder}.conv_norm_out.{t}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return same(format!("{coder}.{rest}"));
    }
    if let Some(t) = rest.strip_prefix("mid.") {
        let (part, t) = t.split_once('.')?;
        return match part {
            "block_1" => same(format!("{coder}.mid_block.resnets.0.{t}")),
            "block_2" => same(format!("{coder}.mid_block.resnets.1.{t}")),
            "attn_1" => {
                let name = vae_attention(t)?;
                let param = t.rsplit('.').next()?;
                let s = if shape.len() > 2 { &shape[..2] } else { shape };
                Some((
                    format!("{coder}.mid_block.attentions.0.{name}.{param}"),
                    s.to_vec(),
                ))
            }
            _ => None,
        };
    }
    let (dir, i, t) = segments(&rest)?;
    // The decoder's `up` list runs from the lowest resolution's index upwards in reverse.
    let (blocks, i) = match (coder, dir) {
        ("encoder", "down") => ("down_blocks", i),
        ("decoder", "up") => ("up_blocks", levels.checked_sub(1 + i)?),
        _ => return None,
    };
    let name = if let Some(t) = t.strip_prefix("block.") {
        format!("resnets.{t}")
    } else if let Some(t) = t.strip_prefix("downsample.") {
        format!("downsamplers.0.{t}")
    } else if let Some(t) = t.strip_prefix("upsample.") {
        format!("upsamplers.0.{t}")
    } else {
        return None;
    };
    same(format!("{coder}.{blocks}.{i}.{name}"))
}

/// The original (ldm) name of a diffusers VAE tensor (the inverse of [`vae_key`]), and whether
/// it is an attention projection (a linear layer in diffusers, a 1×1 conv in the original).
pub fn vae_original(name: &str, levels: usize) -> Option<(String, bool)> {
    let plain = |n: String| Some((n, false));
    let (coder, rest) = name.split_once('.')?;
    if !matches!(coder, "encoder" | "decoder") {
        return matches!(coder, "quant_conv" | "post_quant_conv").then(|| (name.into(), false));
    }
    let rest = rest.replace("conv_shortcut", "nin_shortcut");
    if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        return plain(format!("{coder}.norm_out.{t}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return plain(format!("{coder}.{rest}"));
    }
    if let Some(t) = rest.strip_prefix("mid_block.") {
        if let Some(t) = t.strip_prefix("resnets.0.") {
            return plain(format!("{coder}.mid.block_1.{t}"));
        }
        if let Some(t) = t.strip_prefix("resnets.1.") {
            return plain(format!("{coder}.mid.block_2.{t}"));
        }
        let t = t.strip_prefix("attentions.0.")?;
        let (module, param) = t.rsplit_once('.')?;
        let old = match module {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        return Some((format!("{coder}.mid.attn_1.{old}.{param}"), old != "norm"));
    }
    let (dir, i, t) = segments(&rest)?;
    let (blocks, i) = match (coder, dir) {
        ("encoder", "down_blocks") => ("down", i),
        ("decoder", "up_blocks") => ("up", levels.checked_sub(1 + i)?),
        _ => return None,
    };
    let t = if let Some(t) = t.strip_prefix("resnets.") {
        format!("block.{t}")
    } else if let Some(t) = t.strip_prefix("downsamplers.0.") {
        format!("downsample.{t}")
    } else if let Some(t) = t.strip_prefix("upsamplers.0.") {
        format!("upsample.{t}")
    } else {
        return None;
    };
    plain(format!("{coder}.{blocks}.{i}.{t}"))
}

/// The VAE of a single-file checkpoint under diffusers names.
pub fn vae(w: &Weights, levels: usize) -> Result<Weights> {
    vae_at(w, VAE_PREFIX, levels)
}

/// [`vae`] for a VAE under another prefix (none: a VAE file of its own, as Flux's `ae`).
pub fn vae_at(w: &Weights, prefix: &str, levels: usize) -> Result<Weights> {
    renamed(w, prefix, |k, s| vae_key(k, s, levels))
}

/// The VAE's `config.json` read off the shapes of `first_stage_model.*` (norm groups and scaling
/// left to the config's defaults: SD's 32 and 0.18215).
pub fn vae_config(w: &Weights) -> Result<Value> {
    let p = |k: &str| format!("{VAE_PREFIX}{k}");
    let levels = indices(w, &p("encoder.down.")).len();
    let widths = (0..levels)
        .map(|i| dim(w, &p(&format!("encoder.down.{i}.block.0.conv1.weight")), 0))
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "in_channels": dim(w, &p("encoder.conv_in.weight"), 1)?,
        "out_channels": dim(w, &p("decoder.conv_out.weight"), 0)?,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "block_out_channels": widths,
        "layers_per_block": indices(w, &p("encoder.down.0.block.")).len(),
        "latent_channels": dim(w, &p("decoder.conv_in.weight"), 1)?,
        "use_quant_conv": has(w, &p("quant_conv.weight")),
        "use_post_quant_conv": has(w, &p("post_quant_conv.weight")),
    }))
}

// ---- CLIP text encoder ----

/// The text encoder of a single-file checkpoint under transformers' names (`text_model.*`); old
/// files leave out the `text_model.` level.
pub fn clip(w: &Weights) -> Result<Weights> {
    clip_at(w, CLIP_PREFIX)
}

/// [`clip`] for a text encoder under another prefix (SDXL's
/// `conditioner.embedders.0.transformer.`).
pub fn clip_at(w: &Weights, prefix: &str) -> Result<Weights> {
    renamed(w, prefix, |k, s| {
        if k.ends_with("position_ids") {
            return None;
        }
        let k = k.strip_prefix("text_model.").unwrap_or(k);
        Some((format!("text_model.{k}"), s.to_vec()))
    })
}

/// The `config.json` of the text encoder seen by [`clip`], read off its shapes (OpenAI CLIP: 64
/// channels per head; quick GELU by the config's default).
pub fn clip_config(w: &Weights) -> Result<Value> {
    let [vocab, hidden] = shape(w, "text_model.embeddings.token_embedding.weight")?[..] else {
        return Err(Error(format!("{}: token_embedding is not 2-d", w.path())));
    };
    Ok(json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": dim(w, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "num_hidden_layers": indices(w, "text_model.encoder.layers.").len(),
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": dim(w, "text_model.embeddings.position_embedding.weight", 0)?,
    }))
}
