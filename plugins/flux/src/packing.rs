//! Flux's tokens: latents `[B, C, h, w]` packed as 2×2 patches `[B, (h/2)(w/2), 4C]` (diffusers'
//! `_pack_latents`) and back, and the patches' position ids `(0, row, column)`.

use ferrite_plugin_api::{Error, Result, Tensor};

fn dims(latents: &Tensor) -> Result<[usize; 4]> {
    match latents.shape()?[..] {
        [b, c, h, w] if h % 2 == 0 && w % 2 == 0 => Ok([b, c, h, w]),
        ref s => Err(Error(format!(
            "Flux latents must be [B, C, H, W] with even H and W, got {s:?}"
        ))),
    }
}

pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let [b, c, h, w] = dims(latents)?.map(|d| d as i64);
    latents
        .reshape(&[b, c, h / 2, 2, w / 2, 2])?
        .permute(&[0, 2, 4, 1, 3, 5])?
        .reshape(&[b, (h / 2) * (w / 2), c * 4])
}

/// Tokens `[B, (h/2)(w/2), 4C]` back to latents `[B, C, h, w]`.
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let s = tokens.shape()?;
    let [b, n, c4] = s[..] else {
        return Err(Error(format!("Flux tokens must be [B, N, C], got {s:?}")));
    };
    if n != (h / 2) * (w / 2) || c4 % 4 != 0 {
        return Err(Error(format!(
            "Flux tokens {s:?} do not make {h}×{w} latents"
        )));
    }
    let [b, c, h, w] = [b, c4 / 4, h, w].map(|d| d as i64);
    tokens
        .reshape(&[b, h / 2, w / 2, c, 2, 2])?
        .permute(&[0, 3, 1, 4, 2, 5])?
        .reshape(&[b, c, h, w])
}

/// The ids of the patches of `h × w` latents, row by row.
pub fn image_ids(h: usize, w: usize) -> Vec<[f32; 3]> {
    (0..h / 2)
        .flat_map(|r| (0..w / 2).map(move |c| [0.0, r as f32, c as f32]))
        .collect()
}
